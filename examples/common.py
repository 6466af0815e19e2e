"""Shared pieces of the example experiments: seeded T0 samples, and resumable train / eval steps.

Every experiment writes under its --out directory; re-running skips finished steps (a step is finished when its
summary.json / metrics.json exists — both are written last and atomically by sftlab).
"""

from __future__ import annotations

import json
import random
import shutil
from collections import defaultdict
from pathlib import Path

from rich.console import Console

from sftlab.config import EvalConfig, load_config
from sftlab.data.answers import answer_distribution, degenerate, normalise_answer
from sftlab.config import DataConfig
from sftlab.evaluate.evaluate import evaluate
from sftlab.train.loop import train

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STRIP = "<|endoftext|>"


def t0_tasks(shared: Path = SHARED) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """task -> its template files, and task -> cluster, from t0-tasks.json."""
    tmap = json.loads((shared / "t0-tasks.json").read_text())
    files, cluster = defaultdict(list), {}
    for f in sorted((shared / "t0-mixture").glob("*.jsonl")):
        files[tmap[f.stem]["task"]].append(f)
        cluster[tmap[f.stem]["task"]] = tmap[f.stem]["cluster"]
    return dict(files), cluster


def task_rows(task: str, files: list[Path], seed: int, max_chars: int | None = None) -> list[dict]:
    """All usable examples of a task (its templates pooled), in a seeded order; empty completions skipped."""
    rows = []
    for f in files:
        for line in open(f, encoding="utf-8"):
            r = json.loads(line)
            if not r["completion"].replace(STRIP, "").strip():
                continue
            if max_chars and len(r["prompt"]) + len(r["completion"]) > max_chars:
                continue
            rows.append({"prompt": r["prompt"], "completion": r["completion"], "task": task})
    random.Random(f"{seed}-{task}").shuffle(rows)
    return rows


def balanced_sample(rows: list[dict], n: int, seed: str) -> tuple[list[dict], str | None]:
    """At most `n` of one template's rows with every answer equally often where its answers form a small set
    (`answer_distribution`): the same number of each label, so always giving one answer scores 1 / labels. A
    single-label or imbalanced template gives nothing and the reason (its accuracy would measure the majority
    answer); free-form templates are sampled as they are."""
    dist = answer_distribution([r["completion"].replace(STRIP, "") for r in rows])
    if dist is None:
        return rows[:n], None
    if degenerate(dist):
        return [], (f"{dist['labels'][dist['majority']]}/{dist['n']} answers are {dist['majority']!r}")
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        by_label.setdefault(normalise_answer(r["completion"].replace(STRIP, "")), []).append(r)
    per_label = min(n // len(by_label), min(map(len, by_label.values())))
    picked = [r for group in by_label.values() for r in group[:per_label]]
    return random.Random(seed).sample(picked, len(picked)), None


def balanced_heldout(files: dict[str, list[Path]], tasks: list[str], per_task: int, seed: int,
                     max_chars: int | None = None) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Each held-out task's evaluation rows, label-balanced template by template (`balanced_sample`, about
    `per_task` per task), and the templates left out as single-label or imbalanced ({file stem: why})."""
    heldout, excluded = {}, {}
    for t in tasks:
        kept = []
        for f in files[t]:
            sample, why = balanced_sample(task_rows(t, [f], seed, max_chars), -(-per_task // len(files[t])),
                                          f"{seed}-{f.stem}")
            kept += sample
            if why:
                excluded[f.stem] = why
        if kept:
            heldout[t] = random.Random(f"{seed}-{t}-heldout").sample(kept, len(kept))
    return heldout, excluded


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.rename(path)
    return path


def train_run(run: Path, overrides: list[str], console: Console, keep_model: bool = True) -> dict:
    """`sftlab train` with these overrides into `run` (skipped when its summary exists); returns summary.json."""
    summary = run / "summary.json"
    if not summary.exists():
        train(load_config(None, [f"output_dir={run}", f"data.strip=[{STRIP}]", "data.task_field=task", *overrides]),
              console)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # optimizer state: 1.6 GB per run, not needed here
    if not keep_model:
        shutil.rmtree(run / "model", ignore_errors=True)
        shutil.rmtree(run / "adapter", ignore_errors=True)
    return json.loads(summary.read_text())


def eval_run(model: str | Path, out: Path, data: list[Path], console: Console, base: str | Path | None = None,
             general: list[Path] = (), **kw) -> dict:
    """`sftlab eval` (skipped when out/metrics.json exists); returns metrics.json."""
    metrics = out / "metrics.json"
    if not metrics.exists():
        cfg = EvalConfig(data=[str(p) for p in data], general=[str(p) for p in general], **kw)
        evaluate(cfg, str(model), out, DataConfig(task_field="task", strip=(STRIP,)),
                 base=str(base) if base else None, console=console)
    return json.loads(metrics.read_text())


def model_scores(metrics_dir: Path, role: str = "model", kind: str = "task",
                 metrics: tuple[str, ...] = ("nll", "exact_match", "rouge_l", "correct"), seed: int = 0) -> dict:
    """Macro-over-tasks mean of each per-example metric for one scored model, with a bootstrap 95 % CI
    (examples resampled within their task), from `sftlab eval`'s examples.jsonl."""
    from sftlab.evaluate.metrics import paired_bootstrap_ci

    rows = [json.loads(line) for line in open(metrics_dir / "examples.jsonl", encoding="utf-8")]
    rows = [r for r in rows if r["model"] == role and r["kind"] == kind]
    out = {}
    for m in metrics:
        pairs = [(r[m], r.get("task") or r.get("file")) for r in rows if r.get(m) is not None]
        if pairs:
            vals, groups = zip(*pairs)
            mean, lo, hi = paired_bootstrap_ci([0.0] * len(vals), vals, groups=groups, seed=seed)
            out["accuracy" if m == "correct" else m] = {"mean": mean, "ci95": [lo, hi], "n": len(vals)}
    return out


def fmt_ci(d: dict | None, pct: bool = False) -> str:
    if not d:
        return "-"
    if pct:
        return f"{d['mean']:.1%} [{d['ci95'][0]:.1%}, {d['ci95'][1]:.1%}]"
    return f"{d['mean']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"
