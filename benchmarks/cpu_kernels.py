"""The CPU speed pieces of training, each measured side by side in one run (docs/benchmarks.md).

    python benchmarks/cpu_kernels.py [--threads 2] [--reps 3] [--skip-malloc]

1. attention, one layer of the default model's shape (9 query / 3 KV heads of 64), forward + backward, bf16:
   sftlab's bmm kernel (`CausalBmmAttention`) vs SDPA's flash path, at 8 x 100, 8 x 258, 8 x 512 and 1 x 2048
   tokens (best of --reps, alternating);
2. the default model's forward + backward in bf16 on 8 right-padded rows (random tokens, lengths 60-100 % of the
   width) with `segments` (bmm kernel), `segments` with flash only, and transformers' `sdpa` with its padding mask, at widths 120, 256 and 512 (alternating,
   best of --reps);
3. malloc trimming: in fresh processes with `tune_malloc()` and then the trim threshold set back to 1 GiB (the
   previous setting) or left off, an 8 x 512-token step after two shorter ones (300, 100: the pattern of
   length-grouped batches), with the minor page faults of that step.

Prints one JSON line with the times and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def attention_layer(reps: int) -> dict:
    import torch

    from sftlab.attention import Kernels, causal_attention

    out = {}
    for b, t in ((8, 100), (8, 258), (8, 512), (1, 2048)):
        g = torch.Generator().manual_seed(0)
        q, k, v = ((2 * torch.randn(b, t, h, 64, generator=g)).bfloat16().transpose(1, 2).requires_grad_()
                   for h in (9, 3, 3))
        go = torch.randn(b, 9, t, 64, generator=g).bfloat16()
        times = {"bmm": float("inf"), "flash": float("inf")}
        for _ in range(reps):
            for name, limit in (("bmm", 10**9), ("flash", 0)):
                def step(kernels=Kernels(bmm_max_len=limit)):
                    causal_attention(q, k, v, kernels=kernels).backward(go)
                    q.grad = k.grad = v.grad = None

                times[name] = min(times[name], _best(step, 1))
        out[f"{b}x{t}"] = {"bmm_ms": times["bmm"] * 1e3, "flash_ms": times["flash"] * 1e3,
                           "flash_over_bmm": times["flash"] / times["bmm"]}
    return out


def _padded_batch(width: int, seed: int):
    import random

    import torch

    from sftlab.data.packing import collate_padded
    from sftlab.data.tokenize import Example

    rng = random.Random(seed)
    examples = []
    for n in sorted(rng.randint(int(width * 0.6), width) for _ in range(8)):
        ids = [rng.randrange(3, 49152) for _ in range(n)]
        examples.append(Example(ids, [-100] * (n - 7) + ids[n - 7:]))
    return {k: v for k, v in collate_padded(examples, 0).items() if isinstance(v, torch.Tensor)}


def _load_bf16(attn: str):
    from sftlab.models import load_model

    model = load_model("default", "bf16", attn)
    model.config.use_cache = False
    return model.train()


def _fwd_bwd(model, batch) -> None:
    from sftlab.train.loss import sft_loss_sum

    total, count = sft_loss_sum(model, batch)
    (total / count).backward()
    model.zero_grad(set_to_none=True)


def model_step(reps: int) -> dict:
    from sftlab.attention import Kernels, register
    from sftlab.train.runtime import tune_malloc

    tune_malloc()
    register("segments_flash", Kernels(bmm_max_len=0))  # `segments` with every block on SDPA's flash path
    model = _load_bf16("segments")
    out = {}
    for width in (120, 256, 512):
        batch = _padded_batch(width, seed=width)
        _fwd_bwd(model, batch)
        times = {"segments": float("inf"), "segments_flash": float("inf"), "sdpa": float("inf")}
        for _ in range(reps):
            for name in times:
                model.set_attn_implementation(name)
                times[name] = min(times[name], _best(lambda: _fwd_bwd(model, batch), 1))
        out[f"8x{tuple(batch['input_ids'].shape)[1]}"] = {
            **{f"{k}_s": v for k, v in times.items()}, "sdpa_over_segments": times["sdpa"] / times["segments"],
            "flash_over_bmm": times["segments_flash"] / times["segments"]}
    return out


def child_malloc(trim: str) -> dict:
    """One process: tune_malloc, the trim threshold as given, then long, short, short, long steps."""
    import ctypes

    from sftlab.train.runtime import M_TRIM_THRESHOLD, tune_malloc

    tune_malloc()
    if trim == "1GiB":
        ctypes.CDLL("libc.so.6").mallopt(M_TRIM_THRESHOLD, 1 << 30)
    model = _load_bf16("segments")
    long_batch = _padded_batch(512, seed=1)
    steps = []
    for batch in (long_batch, _padded_batch(300, seed=2), _padded_batch(100, seed=3), long_batch):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        _fwd_bwd(model, batch)
        steps.append({"s": time.perf_counter() - t0, "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults})
    return {"long_after_short_s": steps[-1]["s"], "long_after_short_faults": steps[-1]["minor_faults"],
            "first_long_s": steps[0]["s"]}


def malloc_trim(threads: int) -> dict:
    out = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    for trim in ("1GiB", "off"):
        res = subprocess.run([sys.executable, __file__, "--child-malloc", trim, "--threads", str(threads)],
                             env=env, capture_output=True, text=True, check=True)
        out[f"trim_{trim}"] = json.loads(res.stdout.strip().splitlines()[-1])
    out["ratio_trim_1GiB_over_off"] = out["trim_1GiB"]["long_after_short_s"] / out["trim_off"]["long_after_short_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-malloc", action="store_true", help="leave out part 3 (two model loads in subprocesses)")
    p.add_argument("--child-malloc", choices=["1GiB", "off"], help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child_malloc:
        print(json.dumps(child_malloc(args.child_malloc)))
        return
    from rich.console import Console

    err = Console(stderr=True)
    with err.status("attention, one layer"):
        result = {"benchmark": "cpu_kernels", "threads": args.threads, "attention_layer": attention_layer(args.reps)}
    with err.status("model forward + backward, segments vs sdpa"):
        result["model_fwd_bwd"] = model_step(args.reps)
    if not args.skip_malloc:
        with err.status("malloc trimming, two processes"):
            result["malloc"] = malloc_trim(args.threads)
    a, m = result["attention_layer"], result["model_fwd_bwd"]
    err.print("done: flash/bmm per layer " + ", ".join(f"{k} {v['flash_over_bmm']:.2f}x" for k, v in a.items())
              + "; model step sdpa/segments " + ", ".join(f"{k} {v['sdpa_over_segments']:.2f}x" for k, v in m.items())
              + ", flash/bmm " + ", ".join(f"{k} {v['flash_over_bmm']:.2f}x" for k, v in m.items())
              + (f"; long step after short ones, trim 1 GiB / off {result['malloc']['ratio_trim_1GiB_over_off']:.2f}x"
                 if "malloc" in result else ""))
    from machine import cpu_facts  # benchmarks/machine.py

    print(json.dumps({**result, "machine": cpu_facts()}))


if __name__ == "__main__":
    main()
