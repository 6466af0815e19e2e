"""Does the audit predict learning? (issue: knowledge audit)

For each of several T0 tasks: audit the base model on the task's training sample (s_cond, s_uncond, IFD, optional
few-shot ratio), then fine-tune the base model on that task alone with the same small budget (same examples per task,
same steps, same learning rate) and measure the held-out response loss before and after. Report the per-task table
and the Spearman correlation between each audit score and the held-out gain.

    python examples/audit_predicts_learning.py --out runs/audit-predicts-learning

Resumable: re-running skips tasks whose training summary exists (and the audit resumes on its own).
Everything goes under --out: data/<task>/{train,eval}.jsonl, audit/, train/<task>/summary.json, results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from sftlab.audit.command import run_audit
from sftlab.config import AuditConfig
from sftlab.config import DataConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, STRIP, t0_tasks, task_rows, train_run, write_jsonl  # noqa: E402

DEFAULT_TASKS = ("common_gen,commonsense_qa,social_i_qa,rotten_tomatoes,kilt_tasks_hotpotqa,gigaword,qasc,ag_news,"
                 "app_reviews,quarel")


def write_split(task: str, files: list[Path], n_train: int, n_eval: int, seed: int, out: Path) -> tuple[Path, Path]:
    """A seeded sample of the task (all its templates pooled): disjoint train and held-out files."""
    rows = task_rows(task, files, seed)
    if len(rows) < n_train + n_eval:
        raise SystemExit(f"task {task}: only {len(rows)} usable examples, need {n_train + n_eval}")
    d = out / "data" / task
    return write_jsonl(d / "train.jsonl", rows[:n_train]), write_jsonl(d / "eval.jsonl", rows[n_train:n_train + n_eval])


def train_task(task: str, train_file: Path, eval_file: Path, args, console: Console) -> dict:
    s = train_run(args.out / "train" / task, [
        f"model.path={args.model}", f"data.train=[{train_file}]", f"data.validation=[{eval_file}]",
        f"data.max_length={args.max_length}", f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
        f"train.lr={args.lr}", "train.warmup_ratio=0", "train.scheduler=constant", "train.precision=bf16",
        f"train.seed={args.seed}"], console, keep_model=False)
    return {"loss_before": s["initial_eval_loss"], "loss_after": s["eval_loss"], "steps": s["steps"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/audit-predicts-learning"))
    p.add_argument("--shared", type=Path, default=SHARED)
    p.add_argument("--model", default="default")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated T0 tasks (source data sets)")
    p.add_argument("--train-per-task", type=int, default=48)
    p.add_argument("--eval-per-task", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per task (the same small budget)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--few-shot", type=int, default=2, help="K shots for the audit's few-shot ratio (0: off)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    console = Console(stderr=True)
    t_start = time.perf_counter()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    files, _ = t0_tasks(args.shared)
    unknown = [t for t in tasks if t not in files]
    if unknown:
        raise SystemExit(f"unknown T0 task(s): {', '.join(unknown)}; known: {', '.join(sorted(files))}")
    splits = {t: write_split(t, files[t], args.train_per_task, args.eval_per_task, args.seed, args.out) for t in tasks}

    # 1. audit the base model on every task's training sample (before any training)
    audit = run_audit([str(tr) for tr, _ in splits.values()], args.out / "audit",
                      AuditConfig(dtype="bf16", few_shot=args.few_shot, few_shot_per_task=args.train_per_task,
                                  seed=args.seed),
                      DataConfig(task_field="task", strip=(STRIP,)), args.model, console=console)

    # 2. the same small budget on each task alone
    rows = []
    for t in tasks:
        console.rule(f"train on {t} alone")
        res = train_task(t, *splits[t], args, console)
        a = audit["tasks"][t]
        rows.append({"task": t, "verdict": a["verdict"], "s_cond": a["s_cond"]["p50"], "s_uncond": a["s_uncond"]["p50"],
                     "ifd": a["ifd"]["p50"], "shot_ratio": a["shot_ratio"], **res,
                     "gain": res["loss_before"] - res["loss_after"],
                     "rel_gain": (res["loss_before"] - res["loss_after"]) / res["loss_before"]})

    # 3. does any audit score rank the tasks by how much they learned?
    corr = {}
    for score in ("ifd", "s_cond", "s_uncond", "shot_ratio"):
        xs = [r[score] for r in rows]
        if any(x is None for x in xs):
            continue
        for outcome in ("gain", "rel_gain"):
            rho, pval = spearmanr(xs, [r[outcome] for r in rows])
            corr[f"{score}~{outcome}"] = {"rho": float(rho), "p": float(pval)}
    result = {"tasks": rows, "spearman": corr, "primary": "ifd~rel_gain", "n_tasks": len(rows),
              "budget": {"train_per_task": args.train_per_task, "eval_per_task": args.eval_per_task,
                         "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr},
              "wall_s": round(time.perf_counter() - t_start, 1)}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))

    table = Table(title="audit (base model, train sample) vs held-out response loss after the same small budget")
    for col in ("task", "verdict", "s_cond", "s_uncond", "IFD", "shot ratio", "loss before", "loss after", "gain",
                "rel. gain"):
        table.add_column(col, justify="left" if col in ("task", "verdict") else "right")
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for r in sorted(rows, key=lambda r: r["ifd"]):
        table.add_row(r["task"], r["verdict"], f(r["s_cond"]), f(r["s_uncond"]), f(r["ifd"]), f(r["shot_ratio"]),
                      f(r["loss_before"]), f(r["loss_after"]), f(r["gain"]), f"{r['rel_gain']:.1%}")
    out = Console()
    out.print(table)
    ct = Table(title="Spearman rank correlation, audit score vs held-out gain")
    for col in ("audit score ~ outcome", "rho", "p"):
        ct.add_column(col)
    for k, v in corr.items():
        ct.add_row(k + ("  (primary)" if k == result["primary"] else ""), f"{v['rho']:+.2f}", f"{v['p']:.3f}")
    out.print(ct)
    pr = corr.get(result["primary"])
    console.print(f"done {len(rows)} tasks in {result['wall_s'] / 60:.1f} min; primary Spearman "
                  f"(IFD vs relative gain) rho = {pr['rho']:+.2f} -> {args.out / 'results.json'}" if pr else "done")


if __name__ == "__main__":
    main()
