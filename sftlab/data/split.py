"""`sftlab data split`: task splits (held-out tasks, held-out instances) of instruction data.

Conversations are grouped by task (the data layer's task label: task map, task field or file stem).
Held-out tasks (named, whole clusters from a task map with `cluster`, or a seeded random fraction of
tasks) go entirely to `heldout-tasks`; of every other task a seeded `instance_fraction` of its distinct
conversations goes to `heldout-instances`, the rest to `train`. Identical conversations always land in the
same split, and a held-out conversation identical to a training one (e.g. the same text under two tasks)
is removed from the held-out side and counted.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_write
from .formats import Conversation
from ..config import DataConfig
from .pipeline import DataReport, iter_conversations, record_progress

SPLITS = ("train", "heldout-instances", "heldout-tasks")


@dataclass
class SplitOptions:
    by: str = "task"
    holdout: tuple[str, ...] = ()  # task names
    holdout_cluster: tuple[str, ...] = ()  # cluster names (task map entries with "cluster")
    holdout_fraction: float | None = None  # share of tasks held out, chosen with `seed`
    instance_fraction: float = 0.1  # share of each remaining task's examples in heldout-instances
    seed: int = 0

    def __post_init__(self):
        if self.by != "task":
            raise ValueError(f"--by {self.by!r}: only 'task' is supported")
        if self.holdout_fraction is not None and not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"--holdout-fraction must be in (0, 1), got {self.holdout_fraction}")
        if not 0.0 <= self.instance_fraction < 1.0:
            raise ValueError(f"--instance-fraction must be in [0, 1), got {self.instance_fraction}")
        self.holdout, self.holdout_cluster = tuple(self.holdout), tuple(self.holdout_cluster)


def load_clusters(task_map: str | None) -> dict[str, str]:
    """task -> cluster from a task map whose entries are objects with "task" and "cluster"."""
    if not task_map:
        return {}
    data = json.loads(Path(task_map).read_text(encoding="utf-8"))
    clusters: dict[str, str] = {}
    for stem, v in data.items():
        if isinstance(v, dict) and isinstance(v.get("cluster"), str):
            task = v.get("task", stem)
            if clusters.setdefault(task, v["cluster"]) != v["cluster"]:
                raise ValueError(f"{task_map}: task {task!r} is in clusters {clusters[task]!r} and {v['cluster']!r}")
    return clusters


def choose_heldout_tasks(tasks: list[str], clusters: dict[str, str], opts: SplitOptions) -> set[str]:
    """The held-out tasks: named ones, whole clusters, and a seeded random fraction of the rest (union)."""
    known = set(tasks)
    unknown = [t for t in opts.holdout if t not in known]
    if unknown:
        raise ValueError(f"--holdout {','.join(unknown)}: no such task in the data (tasks: "
                         f"{', '.join(sorted(known)[:40])}{' ...' if len(known) > 40 else ''})")
    held = set(opts.holdout)
    if opts.holdout_cluster:
        if not clusters:
            raise ValueError("--holdout-cluster needs a --task-map whose entries carry a 'cluster'")
        present = {clusters[t] for t in tasks if t in clusters}
        missing = [c for c in opts.holdout_cluster if c not in present]
        if missing:
            raise ValueError(f"--holdout-cluster {','.join(missing)}: no task of the data is in it "
                             f"(clusters: {', '.join(sorted(present))})")
        held |= {t for t in tasks if clusters.get(t) in opts.holdout_cluster}
    if opts.holdout_fraction:
        rest = sorted(known - held)
        k = max(0, max(1, round(opts.holdout_fraction * len(known))) - len(held))
        held |= set(random.Random(opts.seed).sample(rest, min(k, len(rest))))
    if held == known:
        raise ValueError("every task would be held out; nothing is left to train on")
    return held


def split_conversations(convs: list[Conversation], held_tasks: set[str], instance_fraction: float,
                        seed: int) -> tuple[dict[str, list[Conversation]], int]:
    """Assign each conversation to a split (input order kept); returns the splits and the number of
    held-out conversations removed because the same conversation is in train."""
    by_task: dict[str, list[tuple]] = defaultdict(list)
    for c in convs:
        by_task[str(c.task)].append(c.key())
    held_instances: set[tuple] = set()
    for task, keys in by_task.items():
        if task in held_tasks or instance_fraction <= 0:
            continue
        distinct = list(dict.fromkeys(keys))
        if len(distinct) < 2:
            continue
        random.Random(f"{seed}:{task}").shuffle(distinct)
        k = min(len(distinct) - 1, max(1, round(instance_fraction * len(distinct))))
        held_instances |= {(task, key) for key in distinct[:k]}
    out: dict[str, list[Conversation]] = {s: [] for s in SPLITS}
    for c in convs:
        task = str(c.task)
        name = "heldout-tasks" if task in held_tasks else (
            "heldout-instances" if (task, c.key()) in held_instances else "train")
        out[name].append(c)
    train_keys = {c.key() for c in out["train"]}
    removed = 0
    for name in ("heldout-instances", "heldout-tasks"):
        kept = [c for c in out[name] if c.key() not in train_keys]
        removed += len(out[name]) - len(kept)
        out[name] = kept
    return out, removed


def conversation_record(conv: Conversation) -> dict:
    """Messages-format record with the task label (read back with `--task-field task`)."""
    return {"messages": conv.as_dicts(with_train=True), "task": conv.task}


def write_split(inputs: list[str], data_opts: DataConfig, opts: SplitOptions, out_dir: Path, console) -> dict:
    """Read, split and write `train.jsonl`, `heldout-instances.jsonl`, `heldout-tasks.jsonl` and `split.json`."""
    report = DataReport()
    with record_progress(inputs, console, "split") as tick:
        convs = list(iter_conversations(inputs, data_opts, report, on_record=tick))
    if not convs:
        raise ValueError(f"{', '.join(map(str, inputs))}: no valid records to split")
    clusters = load_clusters(data_opts.task_map)
    tasks = sorted({str(c.task) for c in convs})
    held = choose_heldout_tasks(tasks, clusters, opts)
    splits, removed = split_conversations(convs, held, opts.instance_fraction, opts.seed)
    out_dir = Path(out_dir)
    files = {}
    for name in SPLITS:
        files[name] = str(out_dir / f"{name}.jsonl")
        with atomic_write(out_dir / f"{name}.jsonl") as f:
            for c in splits[name]:
                f.write(json.dumps(conversation_record(c), ensure_ascii=False) + "\n")
    per_task = {t: {name: 0 for name in SPLITS} for t in tasks}
    for name in SPLITS:
        for c in splits[name]:
            per_task[str(c.task)][name] += 1
    summary = {
        "by": opts.by, "seed": opts.seed, "inputs": [str(p) for p in inputs],
        "holdout": list(opts.holdout), "holdout_cluster": list(opts.holdout_cluster),
        "holdout_fraction": opts.holdout_fraction, "instance_fraction": opts.instance_fraction,
        "files": files, "counts": {name: len(splits[name]) for name in SPLITS},
        "heldout_tasks": sorted(held), "train_tasks": sorted(set(tasks) - held),
        "clusters": {t: clusters[t] for t in tasks if t in clusters},
        "per_task": per_task, "removed_overlap": removed, "read_back": "--task-field task",
        "data": report.as_dict(),
    }
    with atomic_write(out_dir / "split.json") as f:
        f.write(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    c = summary["counts"]
    console.print(f"[green]done[/] {len(tasks)} tasks ({len(held)} held out); train {c['train']:,}, "
                  f"heldout-instances {c['heldout-instances']:,}, heldout-tasks {c['heldout-tasks']:,}"
                  + (f", {removed} held-out duplicates of train removed" if removed else "")
                  + (f"; {report.invalid.total:,} invalid skipped" if report.invalid.total else "")
                  + f" -> {out_dir} (read back with --task-field task)", highlight=False)
    return summary
