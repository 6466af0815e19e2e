"""Forgetting: narrow fine-tuning measured on general knowledge (NQ-open) before and after, with the mitigations.

One narrow T0 task is fine-tuned hard enough to move the model (several hundred examples, 2 epochs, a high learning
rate). Variants, each with the same data and steps:
  none      full fine-tuning, no mitigation
  replay    general instruction data (Cherry-Alpaca) mixed into every batch (train.replay.ratio)
  kl        KL to the base model's next-token distribution on trained positions (train.kl_to_base)
  lora      a LoRA adapter instead of all weights
  interp    weight-space interpolation of `none` with the base, θ = (1-α)·θ_base + α·θ_tuned (sftlab merge --interpolate)
Each model is evaluated on held-out examples of the task (the gain) and on NQ-open dev questions (the forgetting:
choice accuracy — each gold answer ranked among three other questions' gold answers of the same form, a measure a
change of answer style cannot move alone — and exact match / contains under one fixed 3-shot prompt that shows both
models the answer format; beside them zero-shot exact match, contains and the gold-answer NLL, which are
format-sensitive), paired with the base model's scores on the same items (bootstrap 95 % CIs).
Writes results.json, a table, and forgetting.png (task gain vs forgetting).

    python examples/forgetting.py --out runs/forgetting
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
from common import SHARED, eval_run, t0_tasks, task_rows, train_run, write_jsonl  # noqa: E402

from sftlab.io import table_console  # noqa: E402
from sftlab.evaluate.metrics import paired_bootstrap_ci  # noqa: E402
from sftlab.models import interpolate  # noqa: E402

VARIANTS = ("none", "replay", "kl", "lora", "interp")


def variant_overrides(name: str, args) -> list[str]:
    if name == "replay":
        return [f"train.replay.data=[{args.shared / 'cherry-alpaca-5pct.json'}]", f"train.replay.ratio={args.replay_ratio}"]
    if name == "kl":
        return [f"train.kl_to_base={args.kl}"]
    if name == "lora":
        return ["lora.enabled=true", f"train.lr={args.lora_lr}"]
    return []


def rows_of(ev: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, open(ev / "examples.jsonl", encoding="utf-8")) if r["kind"] == kind]


def paired(base_rows: list[dict], rows: list[dict], metric: str, groups: str | None = "task") -> dict:
    keys = [(r.get("where"), r.get("question")) for r in rows]
    if keys != [(r.get("where"), r.get("question")) for r in base_rows]:
        raise RuntimeError("base and variant were scored on different items")
    pairs = [(b[metric], r[metric], r.get(groups) if groups else 0) for b, r in zip(base_rows, rows)
             if b.get(metric) is not None and r.get(metric) is not None]
    b, t, g = zip(*pairs)
    delta, lo, hi = paired_bootstrap_ci(b, t, groups=g)
    return {"base": sum(b) / len(b), "model": sum(t) / len(t), "delta": delta, "ci95": [lo, hi], "n": len(b)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/forgetting"))
    p.add_argument("--shared", type=Path, default=SHARED)
    p.add_argument("--task", default="gigaword", help="the narrow T0 task")
    p.add_argument("--train-examples", type=int, default=400)
    p.add_argument("--eval-examples", type=int, default=60)
    p.add_argument("--nq", type=int, default=200, help="NQ-open dev questions")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--replay-ratio", type=float, default=0.25)
    p.add_argument("--kl", type=float, default=1.0, help="train.kl_to_base λ")
    p.add_argument("--alpha", type=float, default=0.5, help="interpolation weight of the tuned model")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    console = Console(stderr=True)
    t_start = time.perf_counter()
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")

    files, _ = t0_tasks(args.shared)
    rows = task_rows(args.task, files[args.task], args.seed, max_chars=1500)
    d = args.out / "data"
    train_file = write_jsonl(d / "train.jsonl", rows[:args.train_examples])
    eval_file = write_jsonl(d / "heldout.jsonl", rows[args.train_examples:args.train_examples + args.eval_examples])
    nq = args.shared / "nq-open" / "dev.jsonl"
    recipe = ["model.path=default", f"data.train=[{train_file}]", "data.max_length=512", f"train.epochs={args.epochs}",
              "train.batch_size=8", f"train.lr={args.lr}", "train.warmup_ratio=0.05", "train.precision=bf16",
              f"train.seed={args.seed}"]
    kw = dict(general_limit=args.nq, max_new_tokens=24, qa_max_new_tokens=16, seed=args.seed)

    console.rule("base model")
    base_ev = args.out / "eval" / "base"
    eval_run("default", base_ev, [eval_file], console, general=[nq], **kw)
    models = {}
    for v in variants:
        if v == "interp":
            continue
        console.rule(f"train: {v}")
        run = args.out / "runs" / v
        s = train_run(run, recipe + variant_overrides(v, args), console)
        models[v] = run / ("adapter" if v == "lora" else "model")
        models[v + "_summary"] = s
    if "interp" in variants:
        if "none" not in models:
            raise SystemExit("--variants interp needs none (it interpolates the unmitigated model)")
        target = args.out / "runs" / "interp" / "model"
        if not (target / "config.json").exists():
            interpolate("default", models["none"], args.alpha, target)
        models["interp"] = target

    result = {"task": args.task, "variants": {}, "nq_questions": args.nq,
              "settings": {k: str(v) for k, v in vars(args).items()}}
    for v in variants:
        console.rule(f"evaluate: {v}")
        ev = args.out / "eval" / v
        eval_run(models[v], ev, [eval_file], console, general=[nq], **kw)
        task_b, task_m = rows_of(base_ev, "task"), rows_of(ev, "task")
        qa_b, qa_m = rows_of(base_ev, "qa"), rows_of(ev, "qa")
        result["variants"][v] = {
            "task_rouge_l": paired(task_b, task_m, "rouge_l"), "task_nll": paired(task_b, task_m, "nll"),
            "nq_gold_nll": paired(qa_b, qa_m, "gold_nll", None), "nq_exact_match": paired(qa_b, qa_m, "exact_match", None),
            "nq_contains": paired(qa_b, qa_m, "contains", None),
            "nq_choice_accuracy": paired(qa_b, qa_m, "choice_correct", None),
            "nq_few_shot_exact_match": paired(qa_b, qa_m, "few_shot_exact_match", None),
            "nq_few_shot_contains": paired(qa_b, qa_m, "few_shot_contains", None)}
        s = models.get(v + "_summary")
        if s:
            result["variants"][v]["weight_change"] = s["weight_change"]["overall"]
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))

    t = Table(title=f"narrow fine-tuning on {args.task}: task gain vs forgetting on NQ-open "
                    f"({args.nq} questions), delta vs base [95% CI]")
    for col in ("variant", "task ROUGE-L Δ", "task NLL Δ", "NQ choice accuracy Δ (forgetting ↓)",
                "NQ 3-shot EM Δ", "NQ 3-shot contains Δ", "NQ gold NLL Δ (format-sensitive)",
                "NQ 0-shot contains Δ (format-sensitive)"):
        t.add_column(col)
    c = lambda x, pct=False: (f"{x['delta']:+.1%} [{x['ci95'][0]:+.1%}, {x['ci95'][1]:+.1%}]" if pct  # noqa: E731
                              else f"{x['delta']:+.3f} [{x['ci95'][0]:+.3f}, {x['ci95'][1]:+.3f}]")
    for v, r in result["variants"].items():
        t.add_row(v, c(r["task_rouge_l"], True), c(r["task_nll"]), c(r["nq_choice_accuracy"], True),
                  c(r["nq_few_shot_exact_match"], True), c(r["nq_few_shot_contains"], True), c(r["nq_gold_nll"]),
                  c(r["nq_contains"], True))
    table_console().print(t)
    plot(result, args.out / "forgetting.png")
    console.print(f"done in {result['wall_s'] / 60:.1f} min -> {args.out / 'results.json'}, {args.out / 'forgetting.png'}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for v, r in result["variants"].items():
        acc, y = r["nq_choice_accuracy"], r["task_rouge_l"]  # forgetting: the choice accuracy lost, in points
        x = {"delta": -100 * acc["delta"], "ci95": [-100 * acc["ci95"][1], -100 * acc["ci95"][0]]}
        ax.errorbar(x["delta"], y["delta"] * 100, xerr=[[x["delta"] - x["ci95"][0]], [x["ci95"][1] - x["delta"]]],
                    yerr=[[(y["delta"] - y["ci95"][0]) * 100], [(y["ci95"][1] - y["delta"]) * 100]], fmt="o", capsize=3)
        ax.annotate(v, (x["delta"], y["delta"] * 100), textcoords="offset points", xytext=(6, 4))
    ax.axvline(0, color="grey", lw=0.8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("forgetting: NQ-open choice accuracy lost (points)")
    ax.set_ylabel(f"task gain: {result['task']} ROUGE-L Δ (points)")
    ax.set_title("task gain vs forgetting (up-left is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
