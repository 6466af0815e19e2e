"""Zero-shot exact match of a model on every embedded demo family (greedy), to pick demo families the model
does not already solve.

Per family: exact match (normalised: lowercase, no punctuation) and `contains` (the reference appears as
whole words somewhere in the reply): a family with low exact match but high `contains` fails on answer
format only; one with both low needs a skill the model lacks. Samples come from `sample_family` with a
seed other than the demo's, so no demo example is scored. Progress goes to stderr; stdout gets the table
and one JSON line.

    python benchmarks/demo_zeroshot.py                      # default model, 10 per family, 32 new tokens
    python benchmarks/demo_zeroshot.py --model runs/demo/model --n 20
"""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sftlab.demo_data import FAMILIES, HELDOUT_TASKS, sample_family
from sftlab.evaluate.metrics import contains_answer, exact_match
from sftlab.generate import generate
from sftlab.models import load_model, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=10, help="examples per family")
    ap.add_argument("--seed", type=int, default=123, help="sampling seed (the demo data uses 0)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    err = Console(stderr=True)
    tokenizer, model = load_tokenizer(args.model), load_model(args.model)
    rows = [r for name in FAMILIES for r in sample_family(name, args.n, seed=args.seed)]
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]zero-shot"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err) as progress:
        bar = progress.add_task("zero-shot", total=len(rows))
        gens = generate(model, tokenizer, [r["messages"][:-1] for r in rows], "default",
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        on_batch=lambda k: progress.advance(bar, k))
    dt = time.perf_counter() - t0

    table = Table(title=f"zero-shot on demo families ({args.model}, greedy, {args.max_new_tokens} new tokens)")
    for col in ("family", "split", "n", "exact match", "contains", "first reply"):
        table.add_column(col, justify="right" if col in ("n", "exact match", "contains") else "left")
    result = {}
    for name in FAMILIES:
        pairs = [(r, g) for r, g in zip(rows, gens) if r["task"] == name]
        em = sum(exact_match(g, r["reference"]) for r, g in pairs) / len(pairs)
        ca = sum(contains_answer(g, r["reference"]) for r, g in pairs) / len(pairs)
        result[name] = {"n": len(pairs), "exact_match": em, "contains": ca}
        table.add_row(name, "held-out task" if name in HELDOUT_TASKS else "train", str(len(pairs)), f"{em:.0%}",
                      f"{ca:.0%}", repr(pairs[0][1][:48]))
    Console().print(table)
    err.print(f"[green]done[/] {len(rows)} prompts in {dt:.0f}s ({len(rows) / dt:.2f} prompts/s)", highlight=False)
    from machine import cpu_facts  # benchmarks/machine.py

    print(json.dumps({"model": args.model, "seconds": round(dt, 1), "families": result, "machine": cpu_facts()}))


if __name__ == "__main__":
    main()
