"""Audit throughput vs a pure batched no-grad forward over the same tokens in the same batches.

    python benchmarks/audit_throughput.py [--data ../shared/data/cherry-alpaca-5pct.json] [--n 64]
                                          [--model default] [--dtype fp32]

Runs `sftlab.audit.command.run_audit` (reading, tokenizing, scoring s_cond and s_uncond, pooling, writing the
audit directory) on the first --n examples with an already loaded model, then times the model's own full
forward under `torch.inference_mode()` over exactly the padded batches the audit scored (the batches of
`sftlab.audit.scoring.build_chunks` / `make_batches`, collated by `data.packing.collate_padded`). Prints one JSON line:
audit tokens/s (scoring loop, and end to end), forward tokens/s and their ratio (goal >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cherry-alpaca-5pct.json"))
    p.add_argument("--n", type=int, default=64, help="examples (the first N of the file)")
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--forward-batch-tokens", type=int, default=8192)
    args = p.parse_args()

    import torch
    from rich.console import Console

    from sftlab.audit.command import run_audit
    from sftlab.audit.items import collect_items
    from sftlab.audit.scoring import build_chunks, make_batches
    from sftlab.config import AuditConfig
    from sftlab.data.packing import collate_padded
    from sftlab.config import DataConfig
    from sftlab.lm import model_inputs
    from sftlab.data.template import resolve_template
    from sftlab.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    data = DataConfig(max_length=args.max_length)
    # --n examples: a sample of n per task of a one-task file is its first n in hash order; take the first n lines
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "data.jsonl"
        records = json.loads(Path(args.data).read_text()) if args.data.endswith(".json") else \
            [json.loads(line) for line in open(args.data, encoding="utf-8")]
        src.write_text("".join(json.dumps(r) + "\n" for r in records[:args.n]))
        cfg = AuditConfig(dtype=args.dtype, forward_batch_tokens=args.forward_batch_tokens)
        quiet = Console(stderr=True, quiet=True)

        # the batches the audit scores (same planning code as run_audit)
        items = collect_items([src], tokenizer, data)
        tmpl = resolve_template(data.template, tokenizer)
        chunks = build_chunks(items, items, tokenizer, tmpl, data, cfg)
        batches = [b for c in chunks for b in make_batches(c.jobs, cfg.forward_batch_tokens, cfg.max_batch_size)]
        tokens = sum(j.tokens for b in batches for j in b)
        padded = sum(len(b) * max(j.tokens for j in b) for b in batches)
        collated = [collate_padded([j.example for j in b], tokenizer.pad_token_id) for b in batches]

        def forward(batch):  # the reference cost: a plain batched no-grad forward, full logits
            with torch.inference_mode(), torch.autocast(model.device.type, dtype=torch.bfloat16,
                                                        enabled=args.dtype == "bf16"):
                model(**model_inputs(model, batch), use_cache=False)

        forward(collated[0])  # warm-up
        t0 = time.perf_counter()
        for b in collated:
            forward(b)
        forward_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        run_audit([src], Path(tmp) / "audit", cfg, data, args.model, overwrite=True, console=quiet, model=model,
                  tokenizer=tokenizer)
        end_to_end_s = time.perf_counter() - t0
        meta = json.loads((Path(tmp) / "audit" / "audit.json").read_text())

    assert meta["tokens_scored"] == tokens, (meta["tokens_scored"], tokens)
    audit_tps = tokens / meta["scoring_s"]
    forward_tps = tokens / forward_s
    print(json.dumps({
        "benchmark": "audit_throughput", "model": args.model, "dtype": args.dtype, "examples": len(items),
        "batches": len(batches), "tokens": tokens, "padding_fraction": round(1 - tokens / padded, 4),
        "threads": torch.get_num_threads(),
        "audit_tokens_per_s": round(audit_tps, 1), "audit_end_to_end_tokens_per_s": round(tokens / end_to_end_s, 1),
        "forward_tokens_per_s": round(forward_tps, 1), "ratio": round(audit_tps / forward_tps, 3),
    }))


if __name__ == "__main__":
    main()
