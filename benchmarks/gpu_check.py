"""The GPU check: one script a person with one CUDA GPU runs (≤ 8 minutes), printing one JSON line.

What it runs, each a `benchmarks/vs_trl.py` subprocess on random-weight models of real shapes (sftlab and TRL
on identical steps, bf16 compute with fp32 master weights):
  1. Qwen2.5-0.5B shape, sftlab vs TRL (padding), first-batch loss parity, trained tokens/s, MFU, max allocated;
  2. Llama-3.2-1B shape, the same;
  3. packed rows (train.batching=packed) on the Qwen shape with flash-attention 2 where the `flash_attn` package
     is installed (varlen kernels over the packed segments), PyTorch SDPA otherwise.
The line: {"benchmark": "gpu_check", "machine": ..., "attention_packed": ..., "checks": {name: vs_trl's line},
"summary": {name: {"speedup_vs_trl", "loss_parity", "mfu", "max_allocated_mb"}}, "ok": bool, "wall_s"}.

    bash benchmarks/gpu_check.sh              # defaults sized for ≤ 8 min on one recent GPU
    bash benchmarks/gpu_check.sh --steps 10   # any option below
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each run")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--checks", default="qwen2.5-0.5b,llama-3.2-1b,packed",
                   help="which of qwen2.5-0.5b, llama-3.2-1b, packed")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # tests: the CPU branch
    args = p.parse_args(argv)
    args.checks = [c for c in args.checks.split(",") if c]
    if bad := [c for c in args.checks if c not in ("qwen2.5-0.5b", "llama-3.2-1b", "packed")]:
        p.error(f"--checks: unknown {bad}")
    return args


def packed_attention(flash_installed: bool) -> str:
    """Attention for packed rows on CUDA: flash-attention 2's varlen kernels when the package is there (one
    kernel over all segments, no mask), else SDPA (transformers builds the block-diagonal mask from positions)."""
    return "flash_attention_2" if flash_installed else "sdpa"


def commands(args: argparse.Namespace, flash_installed: bool) -> dict[str, list[str]]:
    """The vs_trl.py command line of each check."""
    common = ["--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size",
              str(args.batch_size), "--max-length", str(args.max_length), "--rounds", str(args.rounds),
              "--precision", "bf16"]
    out = {}
    for arch in ("qwen2.5-0.5b", "llama-3.2-1b"):
        if arch in args.checks:
            out[arch] = [sys.executable, str(HERE / "vs_trl.py"), "--arch", arch, "--trl-modes", "padding", *common]
    if "packed" in args.checks:
        out["packed"] = [sys.executable, str(HERE / "vs_trl.py"), "--arch", "qwen2.5-0.5b", "--ablation",
                         "--variants", "full,packed", "--attention", packed_attention(flash_installed), *common]
    return out


def summarise(name: str, line: dict) -> dict:
    """The figures a reader wants from one check's vs_trl line (`sftlab_vs_trl` or `sftlab_ablation`)."""
    if "error" in line:
        return {"error": line["error"]}
    if line.get("benchmark") == "sftlab_ablation":
        ratio = line.get("ratio_to_full", {})
        mem = line.get("cuda_max_allocated_mb", line.get("peak_rss_mb", {}))
        return {"packed_vs_padded": ratio.get("packed"), "mfu": line.get("fraction_of_bf16_peak", {}).get("packed"),
                "max_allocated_mb": mem.get("packed"), "failed": line.get("failed") or None}
    loss = line.get("first_batch_loss", {})
    return {"speedup_vs_trl": line.get("tokens_per_s_ratio"), "first_loss": [loss.get("sftlab"), loss.get("trl")],
            "loss_parity": bool(loss.get("match")), "mfu": line.get("sftlab_fraction_of_bf16_peak"),
            "max_allocated_mb": line.get("sftlab_cuda_max_allocated_mb"),
            "memory_vs_trl": line.get("memory_ratio")}


def check_line(results: dict[str, dict], machine: dict, attention: str, wall_s: float) -> dict:
    summary = {name: summarise(name, line) for name, line in results.items()}
    ok = all("error" not in s and s.get("loss_parity", True) and not s.get("failed") for s in summary.values())
    return {"benchmark": "gpu_check", "machine": machine, "attention_packed": attention, "checks": results,
            "summary": summary, "ok": ok, "wall_s": round(wall_s, 1)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    from machine import cpu_facts

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); run it on a machine "
                         "with one, with a CUDA build of torch")
    flash = importlib.util.find_spec("flash_attn") is not None
    t0 = time.perf_counter()
    results = {}
    for name, cmd in commands(args, flash).items():
        print(f"gpu_check: {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
        results[name] = json.loads(lines[-1]) if r.returncode == 0 and lines else \
            {"error": f"exit {r.returncode}: {r.stdout[-500:]}"}
    line = check_line(results, cpu_facts(), packed_attention(flash), time.perf_counter() - t0)
    print(json.dumps(line), flush=True)
    return line


if __name__ == "__main__":
    main()
