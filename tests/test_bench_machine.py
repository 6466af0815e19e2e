"""benchmarks/machine.py: every benchmark's JSON line says which CPU (and flags) its figures came from."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_facts_name_the_flags_that_decide_the_kernels():
    machine = load("machine")
    facts = json.loads(json.dumps(machine.cpu_facts()))  # one JSON line's worth
    assert set(facts) == {"cpu", "cpu_flags", "amx", "threads", "torch", "gpu"}
    assert facts["threads"] == torch.get_num_threads() and facts["torch"] == torch.__version__
    if sys.platform.startswith("linux"):
        line = next(x for x in open("/proc/cpuinfo", encoding="utf-8") if x.startswith("flags"))
        flags = set(line.split(":", 1)[1].split())
        assert facts["cpu_flags"] == [f for f in machine.KEY_FLAGS if f in flags]
        assert facts["amx"] == ("amx_bf16" in flags)


def test_audit_eval_speed_helpers():
    bench = load("audit_eval_speed")
    assert bench.matmul_tflops(64, 32, 48, torch.float32, seconds=0.05) > 0
    prompts = bench.sample_prompts(3, 2, seed=0)
    assert len(prompts) == 5 and prompts == bench.sample_prompts(3, 2, seed=0)
