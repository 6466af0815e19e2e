"""benchmarks/gpu_check.py on CPU: what can be checked without a GPU — arguments, the attention choice for packed
rows, the vs_trl command lines, the summary and the JSON line, and the refusal without CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_arguments_and_commands():
    args = gpu_check.parse_args(["--steps", "5", "--checks", "qwen2.5-0.5b,packed"])
    assert args.steps == 5 and args.checks == ["qwen2.5-0.5b", "packed"]
    cmds = gpu_check.commands(args, flash_installed=True)
    assert set(cmds) == {"qwen2.5-0.5b", "packed"}
    q = cmds["qwen2.5-0.5b"]
    assert q[q.index("--device") + 1] == "cuda" and q[q.index("--arch") + 1] == "qwen2.5-0.5b"
    assert q[q.index("--precision") + 1] == "bf16" and q[q.index("--steps") + 1] == "5"
    p = cmds["packed"]
    assert "--ablation" in p and p[p.index("--variants") + 1] == "full,packed"
    assert p[p.index("--attention") + 1] == "flash_attention_2"
    no_flash = gpu_check.commands(args, flash_installed=False)["packed"]
    assert no_flash[no_flash.index("--attention") + 1] == "sdpa"
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--checks", "gpt5"])


def test_every_command_is_accepted_by_vs_trl():
    """vs_trl.py's own parser takes every command line gpu_check builds (it parses before touching a device)."""
    import vs_trl

    for name, cmd in gpu_check.commands(gpu_check.parse_args([]), flash_installed=True).items():
        args = vs_trl.parse_args(cmd[2:])
        assert args.device == "cuda" and args.precision == "bf16" and args.steps == 20
        assert args.ablation == (name == "packed")


def test_summary_and_json_line():
    versus = {"benchmark": "sftlab_vs_trl", "tokens_per_s_ratio": 2.4, "memory_ratio": 0.7,
              "first_batch_loss": {"sftlab": 12.0, "trl": 12.001, "match": True},
              "sftlab_fraction_of_bf16_peak": 0.41, "sftlab_cuda_max_allocated_mb": 9000.0}
    ablation = {"benchmark": "sftlab_ablation", "ratio_to_full": {"full": 1.0, "packed": 1.3},
                "fraction_of_bf16_peak": {"full": 0.4, "packed": 0.5},
                "cuda_max_allocated_mb": {"full": 9000.0, "packed": 8000.0}, "failed": {}}
    line = gpu_check.check_line({"qwen2.5-0.5b": versus, "packed": ablation}, {"cpu": "x"}, "sdpa", 12.3)
    assert line["ok"] and line["summary"]["qwen2.5-0.5b"]["speedup_vs_trl"] == 2.4
    assert line["summary"]["qwen2.5-0.5b"]["loss_parity"] is True
    assert line["summary"]["packed"] == {"packed_vs_padded": 1.3, "mfu": 0.5, "max_allocated_mb": 8000.0,
                                         "failed": None}
    json.dumps(line)  # one JSON line
    bad = gpu_check.check_line({"llama-3.2-1b": {**versus, "first_batch_loss": {"match": False}}}, {}, "sdpa", 1.0)
    assert not bad["ok"]
    assert not gpu_check.check_line({"packed": {"error": "exit 1"}}, {}, "sdpa", 1.0)["ok"]


def test_refuses_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--steps", "1"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "no CUDA GPU visible" in r.stderr and r.stdout == ""
