"""Audit scoring and evaluation generation vs plain transformers, side by side in one run on the same inputs.

    python benchmarks/audit_eval_speed.py [--model default] [--n 96] [--nq 48] [--t0 48] [--max-new-tokens 64]
    python benchmarks/audit_eval_speed.py --skip-generation        # the audit half only (~4 min)

**Audit**: s(y|x) and s(y) of the first --n Cherry-Alpaca examples, as the audit builds them (`build_chunks`: the
conditional and the unconditional sequence of each example), the same sequences for every variant:
- `plain`: transformers' own forward of the fp32 model (its default attention, `sdpa` with the padding mask,
  logits at every position), then the response tokens' NLL from those logits, on length-sorted right-padded
  batches of at most --forward-batch-tokens padded tokens: what a user writes with transformers alone, batched
  as well as padding allows;
- `fp32`: the audit's scorer, exact default, with its own batch plan (`make_batches`: one plan for both kinds;
  packed rows of at most --forward-batch-tokens tokens with `segments` attention where
  `modelcheck.scoring_attention` verifies it; the head at response positions only, in chunks);
- `bf16`: the same with bf16 weights (`audit.dtype=bf16`: how `sftlab audit` loads the model then).
The per-example mean NLLs are compared: `fp32` vs `plain` and `bf16` vs `fp32` (max absolute difference).
`matmul_ceiling_*`: this machine's dense matmul throughput at the model's shapes ([tokens, hidden] x [hidden,
intermediate], bf16 and fp32), and the fraction of the bf16 one the bf16 audit reaches (FLOPs counted as 2 x
body parameters per token plus 2 x head parameters per scored token; attention's own FLOPs not counted).

**Generation**: --nq NQ-open dev questions and --t0 T0-mixture prompts (a seeded sample), one user turn of the
model's chat template each, greedy, at most --max-new-tokens new tokens, stopping at end-of-turn:
- `hf_default`: transformers' `generate` with default settings, as a plain user runs it: batches of
  --hf-batch-size prompts in input order, left-padded;
- `hf_same_batch`: `generate` on length-sorted batches of --batch-size (the best one can do with it);
- `sftlab`: `sftlab.decode.decode`, continuous batching at --batch-size rows (what eval, generate, the audit's
  answers and IFEval use).
`identical_to_hf_default` counts the prompts whose greedy tokens are identical.

Progress on stderr; one JSON line on stdout with the machine (`benchmarks/machine.py`: CPU, AMX or not, threads).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
SHARED = ROOT.parent / "shared" / "data"

from machine import cpu_facts  # noqa: E402  (benchmarks/machine.py)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def matmul_tflops(rows: int, inner: int, cols: int, dtype, seconds: float = 2.0) -> float:
    """Dense [rows, inner] x [inner, cols] throughput (TFLOP/s) over about `seconds`."""
    import torch

    a, b = torch.randn(rows, inner).to(dtype), torch.randn(inner, cols).to(dtype)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * rows * inner * cols * n / (time.perf_counter() - t0) / 1e12


def plain_nll(model, batch) -> list[float]:
    """Mean response NLL per row from the model's own forward (full logits, its attention with the padding mask)."""
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        targets = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none", ignore_index=-100)
        n = (targets != -100).sum(1)
        return (nll.sum(1) / n).tolist()


def audit_half(args, model, tokenizer) -> dict:
    import copy

    import torch

    from sftlab.audit.items import collect_items
    from sftlab.audit.scoring import Scorer, build_chunks, make_batches, score_batch
    from sftlab.config import AuditConfig, DataConfig
    from sftlab.data.packing import collate_padded
    from sftlab.data.template import resolve_template
    from sftlab.lm import base_model
    from sftlab.modelcheck import scoring_attention

    data = DataConfig(max_length=args.max_length)
    cfg = AuditConfig(forward_batch_tokens=args.forward_batch_tokens)
    records = json.loads(Path(args.data).read_text()) if args.data.endswith(".json") else \
        [json.loads(line) for line in open(args.data, encoding="utf-8")]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "data.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in records[:args.n]))
        items = collect_items([src], tokenizer, data)
    tmpl = resolve_template(data.template, tokenizer)
    chunks = build_chunks(items, items, tokenizer, tmpl, data, cfg)
    pad = tokenizer.pad_token_id
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    scorers = {"fp32": Scorer(model, pad, "fp32", True, scoring_attention(model)),
               "bf16": Scorer(bf16_model, pad, "bf16", True, scoring_attention(bf16_model))}
    # plain: length-sorted padded batches (the best a plain forward can do); sftlab: the audit's own plan
    plans = {"plain": [b for c in chunks for b in make_batches(c.jobs, cfg.forward_batch_tokens, cfg.max_batch_size)]}
    for name, scorer in scorers.items():
        plans[name] = [b for c in chunks
                       for b in make_batches(c.jobs, cfg.forward_batch_tokens, cfg.max_batch_size, scorer.packed)]
    tokens = sum(j.tokens for b in plans["plain"] for j in b)
    scored = sum(sum(y != -100 for y in j.example.labels) for b in plans["plain"] for j in b)
    padded = sum(len(b) * max(j.tokens for j in b) for b in plans["plain"])
    collated = [collate_padded([j.example for j in b], pad) for b in plans["plain"]]

    runs: dict[str, tuple[float, list[float]]] = {}
    for name in ("plain", "fp32", "bf16"):
        def one(i, jobs):
            return plain_nll(model, collated[i]) if name == "plain" else score_batch(scorers[name], jobs)[0]
        one(0, plans[name][0])  # warm-up
        t0, means = time.perf_counter(), {}
        for i, jobs in enumerate(plans[name]):
            means.update(zip([(j.index, j.kind) for j in jobs], one(i, jobs)))
        runs[name] = (time.perf_counter() - t0, [means[k] for k in sorted(means)])
        log(f"audit {name}: {runs[name][0]:.1f} s, {tokens / runs[name][0]:,.0f} tokens/s")

    cfg_text = base_model(model).config
    hidden, inter = cfg_text.hidden_size, cfg_text.intermediate_size
    head = base_model(model).get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in base_model(model).parameters()) - base_model(model).get_input_embeddings().weight.numel()
    if base_model(model).get_output_embeddings().weight is not base_model(model).get_input_embeddings().weight:
        body -= head
    ceiling = {dt: matmul_tflops(args.forward_batch_tokens // 2, hidden, inter, getattr(torch, dt))
               for dt in ("bfloat16", "float32")}
    flops = 2 * body * tokens + 2 * head * scored
    diff = lambda a, b: max(abs(x - y) for x, y in zip(runs[a][1], runs[b][1]))  # noqa: E731
    return {
        "audit_examples": len(items), "audit_sequences": sum(len(b) for b in plans["plain"]),
        "audit_tokens": tokens, "audit_scored_tokens": scored,
        "audit_plain_batches": len(plans["plain"]), "audit_plain_padding_fraction": round(1 - tokens / padded, 4),
        "audit_sftlab_forwards": len(plans["fp32"]), "audit_sftlab_packed": scorers["fp32"].packed,
        "scoring_attention": scorers["fp32"].attention or base_model(model).config._attn_implementation,
        **{f"audit_{k}_tokens_per_s": round(tokens / v[0], 1) for k, v in runs.items()},
        "audit_fp32_vs_plain": round(runs["plain"][0] / runs["fp32"][0], 2),
        "audit_bf16_vs_plain": round(runs["plain"][0] / runs["bf16"][0], 2),
        "audit_fp32_max_abs_diff_vs_plain": float(f"{diff('fp32', 'plain'):.2e}"),
        "audit_bf16_max_abs_diff_vs_fp32": float(f"{diff('bf16', 'fp32'):.2e}"),
        "matmul_ceiling_bf16_tflops": round(ceiling["bfloat16"], 3),
        "matmul_ceiling_fp32_tflops": round(ceiling["float32"], 3),
        "audit_bf16_fraction_of_ceiling": round(flops / runs["bf16"][0] / 1e12 / ceiling["bfloat16"], 3),
        "audit_fp32_fraction_of_fp32_ceiling": round(flops / runs["fp32"][0] / 1e12 / ceiling["float32"], 3),
    }


def sample_prompts(n_nq: int, n_t0: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    nq = [json.loads(line)["question"] for line in open(SHARED / "nq-open" / "dev.jsonl", encoding="utf-8")]
    t0 = []
    for f in sorted((SHARED / "t0-mixture").glob("*.jsonl")):
        t0 += [json.loads(line)["prompt"] for line in open(f, encoding="utf-8")][:4]
    return rng.sample(nq, min(n_nq, len(nq))) + rng.sample(t0, min(n_t0, len(t0)))


def generation_half(args, model, tokenizer) -> dict:
    from sftlab.data.template import resolve_template
    from sftlab.decode import decode
    from sftlab.generate import Decoding, _generate_hf, as_messages, decode_stops, encode_prompt

    tmpl = resolve_template("default", tokenizer)
    encoded = [encode_prompt(as_messages(t), tmpl, tokenizer) for t in sample_prompts(args.nq, args.t0, args.seed)]
    budgets = [args.max_new_tokens] * len(encoded)
    stops = decode_stops(tmpl, tokenizer)

    def cut(ids):  # up to and including the first stop id
        return next((ids[:i + 1] for i, t in enumerate(ids) if t in stops.ids), ids)

    def hf_input_order(batch_size):
        out = []
        for s in range(0, len(encoded), batch_size):
            out += _generate_hf(model, tokenizer, tmpl, encoded[s:s + batch_size], budgets[s:s + batch_size],
                                Decoding(args.max_new_tokens), batch_size, None)
        return out

    runs = {}
    for name, fn in [("hf_default", lambda: hf_input_order(args.hf_batch_size)),
                     ("hf_same_batch", lambda: _generate_hf(model, tokenizer, tmpl, encoded, budgets,
                                                            Decoding(args.max_new_tokens), args.batch_size, None)),
                     ("sftlab", lambda: decode(model, encoded, budgets, stops, tokenizer.pad_token_id,
                                               args.batch_size))]:
        t0 = time.perf_counter()
        ids = [cut(x) for x in fn()]
        runs[name] = (time.perf_counter() - t0, ids)
        log(f"generation {name}: {runs[name][0]:.1f} s")
    ref = runs["hf_default"][1]
    return {
        "gen_prompts": len(encoded), "gen_max_new_tokens": args.max_new_tokens, "gen_batch_size": args.batch_size,
        "gen_hf_batch_size": args.hf_batch_size, "gen_new_tokens": sum(len(x) for x in ref),
        **{f"gen_{k}_s": round(v[0], 2) for k, v in runs.items()},
        **{f"gen_{k}_tokens_per_s": round(sum(len(x) for x in v[1]) / v[0], 1) for k, v in runs.items()},
        "gen_speedup_vs_hf_default": round(runs["hf_default"][0] / runs["sftlab"][0], 2),
        "gen_speedup_vs_hf_same_batch": round(runs["hf_same_batch"][0] / runs["sftlab"][0], 2),
        "gen_identical_to_hf_default": sum(a == b for a, b in zip(runs["sftlab"][1], ref)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--data", default=str(SHARED / "cherry-alpaca-5pct.json"))
    p.add_argument("--n", type=int, default=96, help="audited examples (the first N of --data)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--forward-batch-tokens", type=int, default=8192)
    p.add_argument("--nq", type=int, default=48)
    p.add_argument("--t0", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hf-batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--skip-audit", action="store_true")
    args = p.parse_args()

    from sftlab.models import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(args.model), load_model(args.model).eval()
    line = {"benchmark": "audit_eval_speed", "model": args.model, **cpu_facts()}
    if not args.skip_audit:
        line.update(audit_half(args, model, tokenizer))
    if not args.skip_generation:
        line.update(generation_half(args, model, tokenizer))
    print(json.dumps(line))


if __name__ == "__main__":
    main()
