"""Which objective buys the most task gain for the least forgetting? Plain SFT against DFT, ASFT, EAFT, selective
self-rehearsal, KL to the base model, replay and WiSE-FT, on the same data, budget and seed.

Training: `--per-task` examples of every T0 task outside the held-out cluster (as `diversity_vs_volume.py`), one
recipe (`RECIPE` plus the variant's keys). Variants:
  sft             plain SFT (train.objective=nll)
  dft             train.objective=dft (token NLL x its own detached probability, arXiv 2508.05629)
  asft            dft + train.kl_to_base (arXiv 2509.23753)
  eaft            train.objective=eaft (top-20 normalised entropy, arXiv 2601.02151)
  self-rehearsal  sftlab audit --generate on the training set, then select --strategy self-rehearsal: examples the
                  base model already answers right are trained on its own answer (arXiv 2409.04787)
  kl              train.kl_to_base (plain NLL + λ KL(tuned ‖ base))
  replay          Cherry-Alpaca mixed into every batch (train.replay.ratio)
  wise-ft         sftlab merge --interpolate α of the sft model with the base (WiSE-FT)
Every step is an `sftlab` command in its own process (peak memory: one training), resumable (finished steps are
skipped). Each model is evaluated against the base (`sftlab eval --base MODEL`, paired bootstrap 95 % CIs) on
  - gain: the whole held-out T0 cluster (`--holdout-cluster`, label-balanced, single-label templates left out):
    Δ macro NLL, accuracy and ROUGE-L;
  - forgetting: NQ-open and GSM8K questions — choice accuracy (the gold answer ranked among other questions'
    answers of the same form: a change of answer style cannot move it; with `--qa-shots K` also exact match under
    a fixed K-shot prompt) — plus the running forgetting proxy's final KL(p_base ‖ p_tuned) on held-out training
    examples.
Writes results.json, prints the table, and `sftlab report` over all variants (report.html: the trade-off plot
with the Pareto front).

    python examples/objectives.py --out runs/objectives
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, STRIP, balanced_heldout, t0_tasks, task_rows, write_jsonl  # noqa: E402

from sftlab.io import table_console  # noqa: E402

VARIANTS = ("sft", "dft", "asft", "eaft", "self-rehearsal", "kl", "replay", "wise-ft")


def sftlab(*args: str) -> None:
    """One sftlab command in its own process; its output goes to the terminal."""
    cmd = [sys.executable, "-m", "sftlab", *map(str, args)]
    Console(stderr=True).rule(" ".join(cmd[2:5]))
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")


def variant_overrides(name: str, args, selection: Path | None) -> list[str]:
    return {"sft": [], "dft": ["train.objective=dft"], "eaft": ["train.objective=eaft"],
            "asft": ["train.objective=dft", f"train.kl_to_base={args.kl}"],
            "kl": [f"train.kl_to_base={args.kl}"],
            "replay": [f"train.replay.data=[{args.shared / 'cherry-alpaca-5pct.json'}]",
                       f"train.replay.ratio={args.replay_ratio}"],
            "self-rehearsal": [f"data.train=[{selection}]", "data.format=messages"]}.get(name, [])


def build_data(args) -> dict:
    files, cluster = t0_tasks(args.shared)
    held = sorted(t for t, c in cluster.items() if c == args.holdout_cluster)
    if not held:
        raise SystemExit(f"--holdout-cluster {args.holdout_cluster}: no such cluster; "
                         f"known: {', '.join(sorted(set(cluster.values())))}")
    d = args.out / "data"
    train_tasks = sorted(t for t in files if cluster[t] != args.holdout_cluster)
    rows = {t: task_rows(t, files[t], args.seed, args.max_chars) for t in train_tasks}
    train = [r for t in train_tasks if len(rows[t]) >= args.per_task for r in rows[t][:args.per_task]]
    heldout, excluded = balanced_heldout(files, held, args.eval_per_task, args.seed, args.max_chars)
    nq = [json.loads(line) for line in open(args.shared / "nq-open" / "dev.jsonl", encoding="utf-8")]
    gsm = [json.loads(line) for line in open(args.shared / "gsm8k" / "train.jsonl", encoding="utf-8")]
    rng = random.Random(f"{args.seed}:general")
    gsm = [{"question": r["question"], "answer": r["answer"].rsplit("####", 1)[1].strip()}
           for r in rng.sample(gsm, args.gsm8k)]  # the final number: ranked among other questions' numbers
    return {"train": write_jsonl(d / "train.jsonl", train),
            "heldout": [write_jsonl(d / "heldout" / f"{t}.jsonl", r) for t, r in heldout.items()],
            "general": [write_jsonl(d / "nq-open.jsonl", rng.sample(nq, args.nq)),
                        write_jsonl(d / "gsm8k.jsonl", gsm)],
            "info": {"train_examples": len(train), "train_tasks": len({r["task"] for r in train}),
                     "heldout_cluster": args.holdout_cluster, "heldout_tasks": sorted(heldout),
                     "heldout_examples": sum(map(len, heldout.values())), "excluded_templates": excluded,
                     "nq": args.nq, "gsm8k": args.gsm8k}}


def delta(m: dict, *path: str) -> dict | None:
    d = m.get("deltas") or {}
    for k in path:
        d = (d or {}).get(k)
    return d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/objectives"))
    p.add_argument("--shared", type=Path, default=SHARED)
    p.add_argument("--model", default="default", help="the base model (a dir, .gguf or default)")
    p.add_argument("--holdout-cluster", default="sentiment")
    p.add_argument("--per-task", type=int, default=8, help="training examples per T0 task")
    p.add_argument("--eval-per-task", type=int, default=30, help="held-out examples per task of the cluster")
    p.add_argument("--max-chars", type=int, default=1500)
    p.add_argument("--nq", type=int, default=100, help="NQ-open dev questions")
    p.add_argument("--gsm8k", type=int, default=80, help="GSM8K questions (final-number answers)")
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--kl", type=float, default=1.0, help="train.kl_to_base λ of kl and asft")
    p.add_argument("--replay-ratio", type=float, default=0.25)
    p.add_argument("--alpha", type=float, default=0.5, help="WiSE-FT: weight of the sft model")
    p.add_argument("--rehearsal-rouge", type=float, default=None, help="self-rehearsal: ROUGE-L threshold")
    p.add_argument("--qa-shots", type=int, default=0, help="few-shot EM on the probes (0: choice accuracy only, "
                   "the format-independent measure; each shot adds a generation per question and model)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="training overrides for every variant, e.g. train.lr=5e-5")
    args = p.parse_args()
    console = Console(stderr=True)
    t_start = time.perf_counter()
    variants = [v for v in args.variants.split(",") if v]
    if bad := [v for v in variants if v not in VARIANTS]:
        raise SystemExit(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
    if "wise-ft" in variants and "sft" not in variants:
        raise SystemExit("--variants wise-ft needs sft (it interpolates the sft model with the base)")

    data = build_data(args)
    console.print(data["info"])
    runs = args.out / "runs"
    recipe = [f"model.path={args.model}", f"data.train=[{data['train']}]", "data.task_field=task", f"data.strip=[{STRIP}]",
              "data.max_length=512", "data.validation_fraction=0.05", f"train.epochs={args.epochs}",
              "train.batch_tokens=2048", f"train.lr={args.lr}", "train.warmup_ratio=0.05", "train.precision=bf16",
              f"train.seed={args.seed}", "train.eval_every=10", "train.drift_examples=24",
              f"train.drift_general=[{data['general'][0]}]"]
    selection = None
    if "self-rehearsal" in variants:
        audit = args.out / "audit"
        if not (audit / "tasks.json").exists():
            sftlab("audit", data["train"], "--model", args.model, "--out", audit, "--task-field", "task", "--strip",
                   STRIP, "--generate", "--max-new-tokens", "48", "--dtype", "bf16", "--max-length", "512")
        selection = args.out / "self-rehearsal.jsonl"
        if not selection.exists():
            sftlab("select", audit, "--strategy", "self-rehearsal", "--out", selection,
                   *(["--rehearsal-rouge", args.rehearsal_rouge] if args.rehearsal_rouge else []))
    models = {}
    for v in variants:
        if v == "wise-ft":
            continue
        sftlab("train", f"output_dir={runs / v}", *recipe, *variant_overrides(v, args, selection), *args.overrides)
        models[v] = runs / v / "model"
    if "wise-ft" in variants:
        models["wise-ft"] = runs / "wise-ft" / "model"
        if not (models["wise-ft"] / "config.json").exists():
            sftlab("merge", models["sft"], "--interpolate", args.alpha, "--base", args.model, "--out",
                   models["wise-ft"])
    general = [a for g in data["general"] for a in ("--general", g)]
    heldout = [a for f in data["heldout"] for a in ("--data", f)]
    for v in variants:
        sftlab("eval", "--model", models[v], "--base", args.model, *heldout, *general, "--task-field", "task",
               "--strip", STRIP, "--max-new-tokens", "16", "--qa-max-new-tokens", "8", "--qa-shots", args.qa_shots,
               "--seed", args.seed,
               "--out", runs / v / "eval")

    result = {"data": data["info"], "variants": {}, "settings": {k: str(x) for k, x in vars(args).items()}}
    nq, gsm = (str(g) for g in data["general"])
    for v in variants:
        m = json.loads((runs / v / "eval" / "metrics.json").read_text())
        s = json.loads((runs / v / "summary.json").read_text()) if (runs / v / "summary.json").exists() else {}
        result["variants"][v] = {
            "gain_nll": delta(m, "macro", "all", "nll"), "gain_accuracy": delta(m, "macro", "all", "accuracy"),
            "gain_rouge_l": delta(m, "macro", "all", "rouge_l"),
            "nq_choice_accuracy": delta(m, "general", "qa", nq, "choice_accuracy"),
            "gsm8k_choice_accuracy": delta(m, "general", "qa", gsm, "choice_accuracy"),
            "nq_few_shot_exact_match": delta(m, "general", "qa", nq, "few_shot_exact_match"),
            "drift_kl": s.get("drift_kl"), "steps": s.get("steps"),
            "weight_change": (s.get("weight_change") or {}).get("overall"),
            "base": {"accuracy": m["results"]["base"]["macro"]["all"]["accuracy"],
                     "majority_baseline": m["results"]["base"]["macro"]["all"].get("majority_baseline"),
                     "nq_choice_accuracy": m["results"]["base"]["general"]["qa"][nq]["choice_accuracy"],
                     "gsm8k_choice_accuracy": m["results"]["base"]["general"]["qa"][gsm]["choice_accuracy"]}}
    sftlab("report", *(runs / v for v in variants), "--out", args.out / "report.html")
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print_table(result)
    console.print(f"done in {result['wall_s'] / 60:.1f} min -> {args.out / 'results.json'}, "
                  f"{args.out / 'report.html'}")


def print_table(result: dict) -> None:
    info = result["data"]
    t = Table(title=f"{info['train_examples']} examples of {info['train_tasks']} T0 tasks; gain on the held-out "
                    f"'{info['heldout_cluster']}' cluster ({info['heldout_examples']} examples), forgetting on "
                    f"NQ-open ({info['nq']}) and GSM8K ({info['gsm8k']}): Δ vs base [95% CI]")
    for col in ("variant", "held-out NLL Δ", "held-out acc Δ", "held-out ROUGE-L Δ", "NQ choice acc Δ",
                "GSM8K choice acc Δ", "NQ few-shot EM Δ", "drift KL"):
        t.add_column(col)

    def c(x, pct=False):
        if not x:
            return "-"
        f = (lambda v: f"{100 * v:+.1f}") if pct else (lambda v: f"{v:+.3f}")
        return f"{f(x['delta'])} [{f(x['ci95'][0])}, {f(x['ci95'][1])}]"

    for v, r in result["variants"].items():
        kl = r["drift_kl"] or {}
        t.add_row(v, c(r["gain_nll"]), c(r["gain_accuracy"], True), c(r["gain_rouge_l"], True),
                  c(r["nq_choice_accuracy"], True), c(r["gsm8k_choice_accuracy"], True),
                  c(r["nq_few_shot_exact_match"], True),
                  " / ".join(f"{k} {x:.3f}" for k, x in kl.items()) or "-")
    table_console().print(t)


if __name__ == "__main__":
    main()
