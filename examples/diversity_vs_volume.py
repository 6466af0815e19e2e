"""Diversity vs volume: at the same token budget, does training on many tasks (few examples each) generalise to an
unseen cluster of tasks better than training on one task (many examples)?

One whole T0 cluster is held out (default: sentiment — every sentiment data set, never single templates). Its
evaluation set is label-balanced (`--balance`, default): each template with a small answer set contributes the same
number of examples of each answer, and single-label or imbalanced templates (in the shared mixture every imdb and
rotten_tomatoes template: 200/200 one answer) are left out — always giving one answer then scores its majority
baseline, shown beside the accuracies. *diverse*
takes `--per-task` examples from every task of the other clusters; *narrow* takes examples of one task until it has the
same number of tokens (prompt + response, counted with the model's tokenizer). Both train with the same recipe
(1 epoch, token-sized batches, so the step counts follow the token budget). Evaluation on the held-out cluster:
`sftlab eval` of diverse with narrow as its "base" (paired deltas with bootstrap CIs), plus the untouched base model.

    python examples/diversity_vs_volume.py --out runs/diversity-vs-volume

Config: examples/diversity_vs_volume.yaml holds the shared training recipe (overridable with key=value arguments).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (SHARED, STRIP, balanced_heldout, eval_run, fmt_ci, model_scores, t0_tasks, task_rows,  # noqa: E402
                    train_run, write_jsonl)

from sftlab.io import table_console  # noqa: E402
from sftlab.models import load_tokenizer  # noqa: E402

HERE = Path(__file__).resolve().parent


def n_tokens(tokenizer, rows: list[dict]) -> int:
    texts = [r["prompt"] + r["completion"].replace(STRIP, "") for r in rows]
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def build_data(args, tokenizer, console: Console) -> dict:
    files, cluster = t0_tasks(args.shared)
    held = sorted(t for t, c in cluster.items() if c == args.holdout_cluster)
    if not held:
        raise SystemExit(f"--holdout-cluster {args.holdout_cluster}: no such cluster; "
                         f"known: {', '.join(sorted(set(cluster.values())))}")
    if args.narrow_task not in files or cluster[args.narrow_task] == args.holdout_cluster:
        raise SystemExit(f"--narrow-task {args.narrow_task}: must be a T0 task outside the held-out cluster")
    d = args.out / "data"
    rows = {t: task_rows(t, files[t], args.seed, args.max_chars) for t in files}
    # held-out cluster: the evaluation set, one file per task (label-balanced per template unless --no-balance)
    excluded: dict[str, str] = {}
    if args.balance:
        heldout, excluded = balanced_heldout(files, held, args.eval_per_task, args.seed, args.max_chars)
    else:
        heldout = {t: rows[t][:args.eval_per_task] for t in held}
    eval_files = [write_jsonl(d / "heldout" / f"{t}.jsonl", r) for t, r in heldout.items()]
    if not eval_files:
        raise SystemExit(f"--holdout-cluster {args.holdout_cluster}: every template is single-label or imbalanced; "
                         "nothing to evaluate (--no-balance evaluates them anyway)")
    # diverse: a few examples of every other task with enough usable examples
    diverse_tasks = sorted(t for t in files if cluster[t] != args.holdout_cluster and len(rows[t]) >= args.per_task)
    diverse = [r for t in diverse_tasks for r in rows[t][:args.per_task]]
    budget = n_tokens(tokenizer, diverse)
    # narrow: one task, as many examples as it takes to reach the same token budget
    narrow, used = [], 0
    for r in rows[args.narrow_task]:
        if used >= budget:
            break
        narrow.append(r)
        used += n_tokens(tokenizer, [r])
    if used < budget:
        console.print(f"[yellow]{args.narrow_task} has only {used:,} tokens (< {budget:,}): narrow budget is smaller")
    info = {"heldout_cluster": args.holdout_cluster, "heldout_tasks": held, "evaluated_tasks": sorted(heldout),
            "excluded_templates": excluded, "eval_examples": sum(map(len, heldout.values())),
            "balanced": args.balance, "diverse_tasks": diverse_tasks,
        "diverse": {"examples": len(diverse), "tokens": budget, "tasks": len(diverse_tasks)},
        "narrow": {"task": args.narrow_task, "examples": len(narrow), "tokens": used}}
    return {"train": {"diverse": write_jsonl(d / "diverse.jsonl", diverse),
                      "narrow": write_jsonl(d / "narrow.jsonl", narrow)}, "eval": eval_files, "info": info}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/diversity-vs-volume"))
    p.add_argument("--shared", type=Path, default=SHARED)
    p.add_argument("--config", type=Path, default=HERE / "diversity_vs_volume.yaml")
    p.add_argument("--holdout-cluster", default="sentiment")
    p.add_argument("--narrow-task", default="ag_news")
    p.add_argument("--per-task", type=int, default=16, help="examples per task in the diverse set")
    p.add_argument("--eval-per-task", type=int, default=90)
    p.add_argument("--balance", action=argparse.BooleanOptionalAction, default=True,
                   help="held-out templates with a small answer set: the same number of each answer; single-label "
                        "or imbalanced templates are left out (listed in results.json)")
    p.add_argument("--max-chars", type=int, default=1500, help="skip longer examples (CPU budget)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="training overrides, e.g. train.lr=5e-5")
    args = p.parse_args()
    console = Console(stderr=True)
    t_start = time.perf_counter()
    recipe = yaml.safe_load(args.config.read_text())
    model = recipe.get("model", {}).get("path", "default")
    overrides = [f"{k}.{kk}={json.dumps(vv) if isinstance(vv, list) else vv}"
                 for k, v in recipe.items() for kk, vv in v.items()] + args.overrides

    data = build_data(args, load_tokenizer(model), console)
    console.print(data["info"])
    runs = {}
    for name, path in data["train"].items():
        console.rule(f"train {name}")
        runs[name] = train_run(args.out / name, [f"data.train=[{path}]", *overrides], console)
    console.rule("evaluate on the held-out cluster")
    kw = dict(max_new_tokens=16, limit=None, seed=args.seed)
    eval_run(args.out / "diverse" / "model", args.out / "eval-diverse-vs-narrow", data["eval"], console,
             base=args.out / "narrow" / "model", **kw)
    eval_run(model, args.out / "eval-base", data["eval"], console, **kw)

    pair = json.loads((args.out / "eval-diverse-vs-narrow" / "metrics.json").read_text())
    scores = {"base model": model_scores(args.out / "eval-base", "model"),
              "narrow": model_scores(args.out / "eval-diverse-vs-narrow", "base"),
              "diverse": model_scores(args.out / "eval-diverse-vs-narrow", "model")}
    macro = pair["results"]["model"]["macro"]["all"]
    result = {"data": data["info"], "scores": scores, "diverse_minus_narrow": pair["deltas"]["macro"]["all"],
              "majority_baseline": macro.get("majority_baseline"), "degenerate_tasks": macro.get("degenerate_tasks"),
              "answer_warnings": pair["data"].get("answer_warnings", []),
              "train": {k: {"steps": v["steps"], "examples": v["train_examples"], "wall_s": v["wall_s"]}
                        for k, v in runs.items()},
              "wall_s": round(time.perf_counter() - t_start, 1)}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))

    t = Table(title=f"held-out cluster '{args.holdout_cluster}' ({len(data['eval'])} tasks, "
                    f"{data['info']['eval_examples']} examples): macro mean [95% CI]")
    for col in ("model", "train data", "accuracy", "exact match", "ROUGE-L", "response NLL"):
        t.add_column(col)
    desc = {"base model": "-",
            "narrow": f"{args.narrow_task}: {data['info']['narrow']['examples']} ex, {data['info']['narrow']['tokens']:,} tok",
            "diverse": f"{data['info']['diverse']['tasks']} tasks: {data['info']['diverse']['examples']} ex, "
                       f"{data['info']['diverse']['tokens']:,} tok"}
    for name, s in scores.items():
        t.add_row(name, desc[name], fmt_ci(s.get("accuracy"), True), fmt_ci(s.get("exact_match"), True),
                  fmt_ci(s.get("rouge_l"), True), fmt_ci(s.get("nll")))
    d = result["diverse_minus_narrow"]
    dd = lambda m, pct: "-" if not d or not d.get(m) else (  # noqa: E731
        f"{d[m]['delta']:+.1%} [{d[m]['ci95'][0]:+.1%}, {d[m]['ci95'][1]:+.1%}]" if pct
        else f"{d[m]['delta']:+.3f} [{d[m]['ci95'][0]:+.3f}, {d[m]['ci95'][1]:+.3f}]")
    if result["majority_baseline"] is not None:
        t.add_row("majority answer", "always the commonest reference of each task (accuracy / EM baseline)",
                  f"{result['majority_baseline']:.1%}", f"{result['majority_baseline']:.1%}", "", "")
    t.add_row("diverse − narrow", "paired", dd("accuracy", True), dd("exact_match", True), dd("rouge_l", True),
              dd("nll", False))
    table_console().print(t)
    for stem, why in data["info"]["excluded_templates"].items():
        console.print(f"left out of the held-out set: {stem} ({why})")
    console.print(f"{result['degenerate_tasks']} of {len(data['eval'])} evaluated tasks single-label or imbalanced")
    console.print(f"done in {result['wall_s'] / 60:.1f} min -> {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
