"""The objective: log p(response | instruction) vs the whole sequence (the pre-training objective).

The same T0 training sample and the same budget are trained twice: `data.loss_on=assistant` (prompt tokens get label
-100, each response and its end-of-turn token are trained) and `data.loss_on=all` (every token is trained). Both are
evaluated on held-out instances of the training tasks and on held-out tasks (a whole cluster never trained on):
`sftlab eval` of the conditional model with the whole-sequence model as its "base" gives paired deltas with
bootstrap CIs, split into seen and unseen tasks.

    python examples/objective.py --out runs/objective
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, eval_run, fmt_ci, model_scores, t0_tasks, task_rows, train_run, write_jsonl  # noqa: E402

from sftlab.io import table_console  # noqa: E402

RECIPE = ["model.path=default", "data.max_length=512", "train.epochs=1", "train.batch_size=8", "train.lr=1e-4",
          "train.warmup_ratio=0.05", "train.precision=bf16", "train.seed=0"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/objective"))
    p.add_argument("--shared", type=Path, default=SHARED)
    p.add_argument("--holdout-cluster", default="sentiment")
    p.add_argument("--tasks", type=int, default=12, help="training tasks (seeded choice outside the held-out cluster)")
    p.add_argument("--per-task", type=int, default=24)
    p.add_argument("--eval-per-task", type=int, default=24)
    p.add_argument("--max-chars", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="training overrides for both runs, e.g. train.lr=5e-5")
    args = p.parse_args()
    console = Console(stderr=True)
    t_start = time.perf_counter()

    files, cluster = t0_tasks(args.shared)
    rows = {t: task_rows(t, files[t], args.seed, args.max_chars) for t in files}
    need = args.per_task + args.eval_per_task
    pool = sorted(t for t in files if cluster[t] != args.holdout_cluster and len(rows[t]) >= need)
    import random
    tasks = sorted(random.Random(args.seed).sample(pool, min(args.tasks, len(pool))))
    held = sorted(t for t in files if cluster[t] == args.holdout_cluster)
    d = args.out / "data"
    train_file = write_jsonl(d / "train.jsonl", [r for t in tasks for r in rows[t][:args.per_task]])
    eval_files = [write_jsonl(d / "heldout-instances" / f"{t}.jsonl", rows[t][args.per_task:need]) for t in tasks]
    eval_files += [write_jsonl(d / "heldout-tasks" / f"{t}.jsonl", rows[t][:args.eval_per_task]) for t in held]

    for loss_on in ("assistant", "all"):
        console.rule(f"train with data.loss_on={loss_on}")
        train_run(args.out / loss_on, [f"data.train=[{train_file}]", f"data.loss_on={loss_on}", *RECIPE,
                                      *args.overrides], console)
    console.rule("evaluate")
    ev = args.out / "eval-assistant-vs-all"
    m = eval_run(args.out / "assistant" / "model", ev, eval_files, console, base=args.out / "all" / "model",
                 max_new_tokens=32, seed=args.seed)

    # per split (seen = held-out instances of training tasks, unseen = held-out tasks): scores with CIs
    rows_all = [json.loads(line) for line in open(ev / "examples.jsonl", encoding="utf-8")]
    result = {"tasks": tasks, "heldout_tasks": held, "train_examples": len(tasks) * args.per_task, "splits": {},
              "deltas": m["deltas"]["macro"], "wall_s": None}
    t = Table(title="held-out response metrics, macro over tasks [95% CI]")
    for col in ("split", "objective", "response NLL", "exact match", "ROUGE-L", "accuracy"):
        t.add_column(col)
    for split, seen in (("held-out instances", True), ("held-out tasks", False)):
        names = set(tasks if seen else held)
        sub = ev / f".split-{int(seen)}"
        sub.mkdir(exist_ok=True)
        (sub / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_all if r.get("task") in names))
        for role, objective in (("model", "assistant"), ("base", "all")):
            s = model_scores(sub, role)
            result["splits"].setdefault(split, {})[objective] = s
            t.add_row(split, f"loss_on={objective}", fmt_ci(s.get("nll")), fmt_ci(s.get("exact_match"), True),
                      fmt_ci(s.get("rouge_l"), True), fmt_ci(s.get("accuracy"), True))
    for split, key in (("held-out instances", "seen"), ("held-out tasks", "unseen")):
        d = (m["deltas"]["macro"] or {}).get(key) or {}
        cell = lambda k, pct: "-" if not d.get(k) else (  # noqa: E731
            f"{d[k]['delta']:+.1%} [{d[k]['ci95'][0]:+.1%}, {d[k]['ci95'][1]:+.1%}]" if pct
            else f"{d[k]['delta']:+.3f} [{d[k]['ci95'][0]:+.3f}, {d[k]['ci95'][1]:+.3f}]")
        t.add_row(split, "assistant − all", cell("nll", False), cell("exact_match", True), cell("rouge_l", True),
                  cell("accuracy", True))
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    table_console().print(t)
    console.print(f"done in {result['wall_s'] / 60:.1f} min -> {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
