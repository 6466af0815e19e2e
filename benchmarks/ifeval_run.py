"""IFEval end to end through sftlab.ifeval: a seeded sample of prompts -> greedy responses -> the four figures.

Generation wall time and scoring wall time are measured apart (long answers dominate the first). Progress
goes to stderr; stdout gets the table and one JSON line. The responses file is in the upstream format, so
`sftlab ifeval score RESPONSES --inputs FILE --partial` reproduces the figures.

    python benchmarks/ifeval_run.py --limit 20                       # default model, 1024 new tokens
    python benchmarks/ifeval_run.py --model runs/x/model --limit 20 --out runs/x/ifeval_responses.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console

from sftlab.ifeval.responses import generate_responses, write_responses
from sftlab.ifeval.score import load_prompts, score, summary_lines
from sftlab.models import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--inputs", type=Path, default=ROOT.parent / "shared" / "data" / "ifeval" / "input_data.jsonl")
    ap.add_argument("--limit", type=int, default=20, help="seeded sample of prompts (all 541 when 0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--template", default="default")
    ap.add_argument("--out", type=Path, default=Path("ifeval_responses.jsonl"))
    args = ap.parse_args()

    err = Console(stderr=True)
    prompts = load_prompts(args.inputs, limit=args.limit or None, seed=args.seed)
    tokenizer, model = load_tokenizer(args.model), load_model(args.model)
    t0 = time.perf_counter()
    responses = generate_responses(model, tokenizer, args.template, prompts, max_new_tokens=args.max_new_tokens,
                                   batch_size=args.batch_size, console=err)
    gen_s = time.perf_counter() - t0
    write_responses(args.out, prompts, responses)
    t1 = time.perf_counter()
    result = score(prompts, responses)
    score_s = time.perf_counter() - t1
    new_tokens = sum(len(tokenizer(r, add_special_tokens=False).input_ids) for r in responses)
    print("\n".join(summary_lines(result)))
    from machine import cpu_facts  # benchmarks/machine.py

    print(json.dumps({"machine": cpu_facts(), "model": args.model, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                      "batch_size": args.batch_size, "generate_s": round(gen_s, 1), "score_s": round(score_s, 1),
                      "response_tokens": new_tokens, **{k: result[k] for k in
                      ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose")}}))


if __name__ == "__main__":
    main()
