"""`sftlab demo`: the whole cycle on the embedded data — held-out accuracy before, train, held-out accuracy after.

Everything goes under `runs/demo/`: `data/` (the generated splits), `train/` (checkpoints, metrics, the
tuned model), `before.jsonl` / `after.jsonl` (generations), `summary.json` (per-family exact match).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .config import load_config
from .demo_data import check, write_demo_data
from .generate import generate
from .models import load_model, load_tokenizer

EVAL_SPLITS = ("heldout_instances", "heldout_tasks")


def demo_config(out: Path, data: dict[str, Path], model: str, overrides: list[str]):
    return load_config(None, [
        f"output_dir={out / 'train'}", f"model.path={model}", f"data.train=[{data['train']}]",
        f"data.eval=[{data['heldout_instances']}]", "data.task_field=task", "data.max_length=256",
        "train.epochs=1", "train.batch_size=16", "train.lr=1e-4", "train.warmup_ratio=0.05",
        "train.precision=bf16", "train.save_every=8", "train.eval_every=8", *overrides])


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def answer_all(model_spec, records: dict[str, list[dict]], console: Console, label: str,
               max_new_tokens: int = 16) -> dict[str, list[str]]:
    model = load_model(model_spec).eval()
    tokenizer = load_tokenizer(model_spec)
    total = sum(len(v) for v in records.values())
    out = {}
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        bar = progress.add_task(label, total=total)
        for split, rows in records.items():
            prompts = [r["messages"][:-1] for r in rows]
            out[split] = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=16,
                                  on_batch=lambda n: progress.advance(bar, n))
    return out


def score(records: dict[str, list[dict]], answers: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Exact match per split and family, plus each split's mean over families."""
    result = {}
    for split, rows in records.items():
        hits = defaultdict(list)
        for rec, ans in zip(rows, answers[split]):
            hits[rec["task"]].append(check(ans, rec))
        fam = {t: sum(v) / len(v) for t, v in sorted(hits.items())}
        result[split] = {"families": fam, "mean": sum(fam.values()) / len(fam)}
    return result


def run_demo(out_dir: str | Path = "runs/demo", model: str = "default", overrides: list[str] | None = None,
             console: Console | None = None, n_show: int = 6) -> dict:
    from .train.loop import train

    console = console or Console(stderr=True)
    out = Path(out_dir)
    t0 = time.perf_counter()
    data = write_demo_data(out / "data")
    records = {s: _read(data[s]) for s in EVAL_SPLITS}
    console.print(f"demo data: {sum(1 for _ in open(data['train']))} train examples, "
                  + ", ".join(f"{len(v)} {k}" for k, v in records.items()) + f" -> {out / 'data'}")
    before = answer_all(model, records, console, "answer (base)")
    result = train(demo_config(out, data, model, overrides or []), console, resume=True)
    after = answer_all(result.model_dir, records, console, "answer (tuned)")
    for name, answers in (("before", before), ("after", after)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for split, rows in records.items():
                for rec, ans in zip(rows, answers[split]):
                    f.write(json.dumps({"split": split, "task": rec["task"], "prompt": rec["messages"][-2]["content"],
                                        "reference": rec["reference"], "generation": ans,
                                        "correct": check(ans, rec)}) + "\n")
    s_before, s_after = score(records, before), score(records, after)
    summary = {"before": s_before, "after": s_after, "train_steps": result.steps, "final_loss": result.final_loss,
               "eval_loss": result.eval_loss, "weight_change": result.weight_change,
               "model_dir": str(result.model_dir), "wall_s": time.perf_counter() - t0}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print(records, before, after, s_before, s_after, n_show)
    console.print(f"[green]done[/] demo in {summary['wall_s'] / 60:.1f} min: held-out instances "
                  f"{s_before['heldout_instances']['mean']:.0%} -> {s_after['heldout_instances']['mean']:.0%}, "
                  f"held-out tasks {s_before['heldout_tasks']['mean']:.0%} -> {s_after['heldout_tasks']['mean']:.0%} "
                  f"exact match -> {out}", highlight=False)
    return summary


def _print(records, before, after, s_before, s_after, n_show: int) -> None:
    con = Console()
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
    for split in EVAL_SPLITS:
        for rec, b, a in list(zip(records[split], before[split], after[split]))[: n_show // 2]:
            g.add_row(rec["messages"][-2]["content"], rec["reference"], b, a)
    con.print(g)
