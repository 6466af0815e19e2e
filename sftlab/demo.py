"""`sftlab demo`: the whole cycle on the embedded data, as one `sftlab run` with a built-in config.

Everything goes under the run directory (default `runs/demo/`): `data/` (the generated splits), then the
run's layout (`sftlab.layout`): `audit/` (what the base model already knows about the training
families, a small sample per family), `train/` (checkpoints, metrics, the tuned model), `eval/metrics.json`
(tuned vs base on held-out instances and held-out families, exact match per family), `report.html`,
`run.json`. The terminal shows the before/after exact match per family and generations side by side.
Re-running resumes; `overrides` are config keys (`train.epochs=2`); a changed setting redoes the stages it
affects (the demo is disposable).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from . import layout
from .config import RunConfig, load_config
from .demo_data import FAMILIES, HELDOUT_TASKS, write_demo_data
from .io import table_console

EVAL_SPLITS = ("heldout_instances", "heldout_tasks")


def demo_config(out: Path, data: dict[str, Path], model: str, overrides: list[str], bf16: bool = True) -> RunConfig:
    """The demo's run config; `bf16`: bf16 weights for training and the audit (where bf16 is native,
    `models.bf16_native`), else fp32."""
    j = json.dumps  # JSON is YAML: paths with spaces or colons stay one string
    precision = ["train.precision=bf16-master", "audit.dtype=bf16"] if bf16 else ["train.precision=fp32",
                                                                                 "audit.dtype=fp32"]
    return load_config(None, [
        f"output_dir={j(str(out))}", f"model.path={j(model)}", f"data.train={j([str(data['train'])])}",
        f"data.validation={j([str(data['heldout_instances'])])}", "data.task_field=task", "data.max_length=256",
        "train.epochs=1", "train.batch_size=16", "train.lr=1e-4", "train.warmup_ratio=0.05",
        *precision, "train.save_every=8", "train.eval_every=8",
        "audit.limit_per_task=8",  # cheap: NLLs of 8 examples per family, no generation
        f"eval.data={j([str(data[s]) for s in EVAL_SPLITS])}", "eval.max_new_tokens=16", "eval.batch_size=32",
        f"eval.general={j([str(data['general'])])}", "eval.qa_max_new_tokens=8", "eval.qa_shots=0",  # forgot: choices
        f"eval.generations={len(FAMILIES)}",  # one per family (eval takes them task by task)
        *overrides])


def split_of(task: str) -> str:
    return "heldout_tasks" if task in HELDOUT_TASKS else "heldout_instances"


def demo_scores(metrics: dict) -> dict[str, dict]:
    """{"before" | "after": {split: {"families": {family: exact match}, "mean": mean over families}}} from
    an eval metrics.json (base = before, model = after)."""
    out = {}
    for label, role in (("before", "base"), ("after", "model")):
        tasks = metrics["results"][role]["tasks"]
        per = {}
        for split in EVAL_SPLITS:
            fam = {t: v["exact_match"] for t, v in sorted(tasks.items()) if split_of(t) == split}
            per[split] = {"families": fam, "mean": sum(fam.values()) / len(fam) if fam else None}
        out[label] = per
    return out


def demo_general(metrics: dict) -> dict | None:
    """The general-knowledge probe's choice accuracy before and after ({"before", "after", "delta", "ci95", "n"}),
    None without one."""
    qa = metrics["results"]["model"]["general"]["qa"]
    if not qa:
        return None
    path, v = next(iter(qa.items()))
    base = metrics["results"].get("base", {}).get("general", {}).get("qa", {}).get(path) or {}
    d = ((metrics.get("deltas") or {}).get("general", {}).get("qa", {}).get(path) or {}).get("choice_accuracy")
    return {"before": base.get("choice_accuracy"), "after": v["choice_accuracy"], "n": v["n_choice"],
            "delta": d["delta"] if d else None, "ci95": d["ci95"] if d else None}


def demo_generations(metrics: dict, n_show: int) -> list[dict]:
    """Up to n_show // 2 side-by-side generations from each split, in the order eval kept them."""
    gens = [g for g in metrics.get("generations") or [] if g.get("kind") == "task"]
    return [g for split in EVAL_SPLITS for g in [g for g in gens if split_of(g["task"]) == split][: n_show // 2]]


def run_demo(out_dir: str | Path = "runs/demo", model: str = "default", overrides: list[str] | None = None,
             console: Console | None = None, n_show: int = 6) -> dict:
    from .runner import run_pipeline, run_summary_line

    console = console or Console(stderr=True)
    out = Path(out_dir)
    t0 = time.perf_counter()
    data = write_demo_data(out / "data")
    counts = {s: sum(1 for _ in open(p, encoding="utf-8")) for s, p in data.items()}
    console.print("demo data: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f" -> {escape(str(out / 'data'))}",
                  highlight=False)
    import torch

    from .models import bf16_native

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = bf16_native(device)
    why = "bf16 is native here" if bf16 else ("no AVX-512 BF16 or AMX on this CPU" if device == "cpu"
                                              else "this GPU has no bf16")
    console.print(f"precision: {'bf16 weights' if bf16 else 'fp32'} ({why})", highlight=False)
    log = run_pipeline(demo_config(out, data, model, overrides or [], bf16), console, on_change="redo",
                       summary=False)
    metrics = json.loads((out / layout.EVAL_DIR / layout.EVAL_METRICS).read_text(encoding="utf-8"))
    scores = demo_scores(metrics)
    _print(scores["before"], scores["after"], demo_generations(metrics, n_show))
    wall = time.perf_counter() - t0
    b, a = scores["before"], scores["after"]
    general = demo_general(metrics)
    forgot = ""
    if general and general["before"] is not None:
        forgot = (f"; general knowledge (choice accuracy, {general['n']} questions) {general['before']:.0%} -> "
                  f"{general['after']:.0%}")
    console.print(f"[green]done[/] demo in {wall / 60:.1f} min: held-out instances "
                  f"{b['heldout_instances']['mean']:.0%} -> {a['heldout_instances']['mean']:.0%}, held-out tasks "
                  f"{b['heldout_tasks']['mean']:.0%} -> {a['heldout_tasks']['mean']:.0%} exact match{forgot}; "
                  f"{escape(run_summary_line(log))} -> {escape(str(out))}", highlight=False, soft_wrap=True)
    return {**scores, "general": general, "stages": log["stages"], "wall_s": wall}


def _print(s_before, s_after, gens: list[dict]) -> None:
    con = table_console()
    t = Table(title="exact match on held-out data (before -> after fine-tuning)")
    for col in ("split", "family", "before", "after"):
        t.add_column(col, justify="right" if col in ("before", "after") else "left")
    for split in EVAL_SPLITS:
        for fam, b in s_before[split]["families"].items():
            a = s_after[split]["families"][fam]
            t.add_row(split, fam, f"{b:.0%}", f"[{'green' if a > b else 'red' if a < b else 'white'}]{a:.0%}")
        t.add_row(split, "[bold]mean", f"{s_before[split]['mean']:.0%}", f"[bold]{s_after[split]['mean']:.0%}")
    con.print(t)
    g = Table(title="generations side by side", show_lines=True)
    for col in ("prompt", "reference", "before", "after"):
        g.add_column(col, overflow="fold")
    for row in gens:
        g.add_row(*(Text(str(row.get(k) or "")) for k in ("prompt", "reference", "base", "model")))
    con.print(g)
