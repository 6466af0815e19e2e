"""Generalisation: task splits (held-out tasks, held-out instances) and per-task metrics.

Splits (`sftlab data split`): conversations are grouped by task (the data layer's task label: task map,
task field or file stem). Held-out tasks (named, whole clusters from a task map with `cluster`, or a
seeded random fraction of tasks) go entirely to `heldout-tasks`; of every other task a seeded
`instance_fraction` of its distinct conversations goes to `heldout-instances`, the rest to `train`.
Identical conversations always land in the same split, and a held-out conversation identical to a
training one (e.g. the same text under two tasks) is removed from the held-out side and counted.

Task metrics, per evaluated example (the last assistant turn is the reference, the messages before it
the prompt):
- `nll`: mean NLL (nats/token) over the example's trained tokens, exactly the data layer's labels
  (response tokens plus the end-of-turn marker, every trained assistant turn);
- `exact_match`: normalised generation equals the normalised reference (`metrics.normalise_answer`);
- `rouge_l`: ROUGE-L F1 of generation against reference;
- `accuracy`: only for tasks whose references form a small label set (`metrics.label_set`): the
  generation mapped onto a label (`metrics.predict_label`) equals the reference's label.
Generation is greedy, with at most `max_new_tokens`, and per task at most 16 tokens more than the
task's longest reference (a short label needs no 64-token budget). Per-task values are means over its
examples; macro averages are means over tasks (accuracy: over label-set tasks only).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..data.formats import Conversation, Message
from ..data.load import expand_paths
from ..data.pipeline import DataOptions, DataReport, iter_conversations, iter_examples
from ..data.template import resolve_template
from ..data.tokenize import Dropped, Example, protected_pattern
from ..data.validate import DataError
from ..lm import GEN_MARGIN
from .scoring import tokenize_conversations
from .metrics import exact_match, label_set, normalise_answer, paired_bootstrap_ci, predict_label, rouge_l

SPLITS = ("train", "heldout-instances", "heldout-tasks")
METRICS = ("nll", "exact_match", "rouge_l", "accuracy")
LOWER_IS_BETTER = {"nll", "gold_nll", "perplexity"}


# ---- splits ---------------------------------------------------------------------------------------------------
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
    msgs = []
    for m in conv.messages:
        d = {"role": m.role, "content": m.content}
        if m.train is not None:
            d["train"] = m.train
        msgs.append(d)
    return {"messages": msgs, "task": conv.task}


def write_split(inputs: list[str], data_opts: DataOptions, opts: SplitOptions, out_dir: Path, console) -> dict:
    """Read, split and write `train.jsonl`, `heldout-instances.jsonl`, `heldout-tasks.jsonl` and `split.json`."""
    from ..data.pipeline import record_progress
    from ..io import atomic_write

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


# ---- task metrics ---------------------------------------------------------------------------------------------
@dataclass
class TaskItem:
    """One evaluated example: its tokens (for NLL), prompt (for generation) and reference answer."""

    where: str
    task: str
    example: Example
    conversation: Conversation
    prompt: Conversation = field(init=False)
    reference: str = field(init=False)

    def __post_init__(self):
        msgs = self.conversation.messages
        last = max(i for i, m in enumerate(msgs) if m.role == "assistant")
        self.prompt = Conversation(msgs[:last], self.task, self.conversation.where)
        self.reference = msgs[last].content


def sample_records(stream, k: int, seed: str) -> list:
    """A seeded uniform sample of k items of a stream (reservoir sampling), in stream order."""
    rng = random.Random(seed)
    kept: list[tuple[int, object]] = []
    for i, x in enumerate(stream):
        if i < k:
            kept.append((i, x))
        else:
            j = rng.randint(0, i)
            if j < k:
                kept[j] = (i, x)
    return [x for _, x in sorted(kept, key=lambda p: p[0])]


def load_task_items(inputs: list[str], tokenizer, opts: DataOptions, limit: int | None = None,
                    report: DataReport | None = None, on_record: Callable[[], None] | None = None,
                    seed: int = 0) -> list[TaskItem]:
    """Every valid example of the inputs, or with `limit` a seeded random sample of `limit` valid conversations
    per file (files are often sorted by label, so the first N would be one class); tokenized and masked
    exactly as the data layer does for training."""
    report = report if report is not None else DataReport()
    items = []
    if limit is None:
        for ex, conv in iter_examples(inputs, tokenizer, opts, report, on_record=on_record, with_conversation=True):
            items.append(TaskItem(str(conv.where), str(conv.task), ex, conv))
        return items
    tmpl = resolve_template(opts.template, tokenizer)
    special = protected_pattern(tokenizer).findall
    for path in expand_paths(inputs):
        convs = sample_records(iter_conversations([path], opts, report, special, on_record), limit,
                               f"{seed}:{path.name}")
        for conv, res in zip(convs, tokenize_conversations(convs, tokenizer, tmpl, opts.tokenize)):
            if isinstance(res, Example):
                report.kept += 1
                report.truncated += res.truncated
                items.append(TaskItem(str(conv.where), str(conv.task), res, conv))
            elif isinstance(res, Dropped):
                report.dropped[res.reason] += 1
            elif opts.skip_invalid and isinstance(res, DataError):
                report.invalid.add(res)
            else:
                raise res
    return items


def generation_budgets(items: list[TaskItem], tokenizer, max_new_tokens: int,
                       margin: int = GEN_MARGIN) -> dict[str, int]:
    """Per task: min(max_new_tokens, longest reference in tokens + margin)."""
    longest: dict[str, int] = defaultdict(int)
    for it in items:
        n = len(tokenizer(it.reference, add_special_tokens=False).input_ids)
        longest[it.task] = max(longest[it.task], n)
    return {t: max(1, min(max_new_tokens, n + margin)) for t, n in longest.items()}


def task_label_sets(items: list[TaskItem], max_labels: int = 20) -> dict[str, list[str] | None]:
    refs: dict[str, list[str]] = defaultdict(list)
    for it in items:
        refs[it.task].append(it.reference)
    return {t: label_set(r, max_labels) for t, r in refs.items()}


def score_task_rows(items: list[TaskItem], nlls, generations: list[str],
                    labels: dict[str, list[str] | None]) -> list[dict]:
    """Per example: task, nll (mean nats/token), tokens, exact_match, rouge_l, correct (None: no label set)."""
    rows = []
    for it, nll, gen in zip(items, nlls, generations, strict=True):
        lab = labels.get(it.task)
        correct = None
        if lab is not None:
            correct = float(predict_label(gen, lab) == normalise_answer(it.reference))
        rows.append({"where": it.where, "task": it.task, "nll": nll.mean, "tokens": nll.tokens,
                     "exact_match": float(exact_match(gen, it.reference)), "rouge_l": rouge_l(gen, it.reference),
                     "correct": correct, "generation": gen})
    return rows


def _metric_values(rows: list[dict], metric: str) -> list[float | None]:
    key = "correct" if metric == "accuracy" else metric
    return [r[key] for r in rows]


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarise_tasks(rows: list[dict], training_tasks: list[str] | None) -> dict:
    """{"tasks": {task: {n, seen, nll, exact_match, rouge_l, accuracy}}, "macro": {"all"|"seen"|"unseen": ...}}"""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    seen = set(training_tasks) if training_tasks is not None else None
    tasks = {}
    for t in sorted(by_task):
        rs = by_task[t]
        tasks[t] = {"n": len(rs), "seen": None if seen is None else t in seen,
                    **{m: _mean(_metric_values(rs, m)) for m in METRICS}}
    macro = {"all": _macro(tasks, lambda v: True)}
    if seen is not None:
        macro["seen"] = _macro(tasks, lambda v: v["seen"])
        macro["unseen"] = _macro(tasks, lambda v: not v["seen"])
    return {"tasks": tasks, "macro": macro}


def _macro(tasks: dict, keep) -> dict | None:
    chosen = [v for v in tasks.values() if keep(v)]
    if not chosen:
        return None
    out = {"tasks": len(chosen), "n": sum(v["n"] for v in chosen)}
    out.update({m: _mean(v[m] for v in chosen) for m in METRICS})
    return out


def delta_entry(base: list[float], tuned: list[float], groups=None, weights=None, n_resamples: int = 1000,
                seed: int = 0) -> dict:
    d, lo, hi = paired_bootstrap_ci(base, tuned, groups=groups, weights=weights, n_resamples=n_resamples, seed=seed)
    return {"delta": d, "ci95": [lo, hi], "n": len(base)}


def task_deltas(base_rows: list[dict], tuned_rows: list[dict], training_tasks: list[str] | None,
                n_resamples: int = 1000, seed: int = 0) -> dict:
    """Model minus base per task and macro-averaged (all / seen / unseen), paired bootstrap 95 % CIs."""
    if [r["where"] for r in base_rows] != [r["where"] for r in tuned_rows]:
        raise ValueError("base and model were scored on different examples; cannot pair them")
    seen = set(training_tasks) if training_tasks is not None else None

    def deltas(idx: list[int], grouped: bool) -> dict:
        out = {}
        for m in METRICS:
            pairs = [(_metric_values([base_rows[i]], m)[0], _metric_values([tuned_rows[i]], m)[0], base_rows[i]["task"])
                     for i in idx]
            pairs = [p for p in pairs if p[0] is not None and p[1] is not None]
            if pairs:
                a, b, g = zip(*pairs)
                out[m] = delta_entry(list(a), list(b), list(g) if grouped else None, None, n_resamples, seed)
            else:
                out[m] = None
        return out

    by_task: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(base_rows):
        by_task[r["task"]].append(i)
    result = {"tasks": {t: deltas(idx, False) for t, idx in sorted(by_task.items())},
              "macro": {"all": deltas(list(range(len(base_rows))), True)}}
    if seen is not None:
        for name, keep in (("seen", lambda t: t in seen), ("unseen", lambda t: t not in seen)):
            idx = [i for i, r in enumerate(base_rows) if keep(r["task"])]
            result["macro"][name] = deltas(idx, True) if idx else None
    return result


# ---- few-shot prompting baseline --------------------------------------------------------------------------------
def few_shot_conversations(items: list[TaskItem], k: int, seed: int = 0) -> list[Conversation]:
    """Each example preceded by k demonstrations of its own task (other examples, chosen with `seed`);
    demonstration answers are context, not scored (train=False)."""
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_task[it.task].append(i)
    out = []
    for i, it in enumerate(items):
        others = [j for j in by_task[it.task] if j != i]
        demos = random.Random(f"{seed}:{i}").sample(others, min(k, len(others)))
        msgs = it.conversation.messages
        head = [m for m in msgs[:1] if m.role == "system"]
        shots = []
        for j in demos:
            for m in items[j].conversation.messages:
                if m.role != "system":
                    shots.append(Message(m.role, m.content, False if m.role == "assistant" else m.train))
        out.append(Conversation(head + shots + msgs[len(head):], it.task, it.conversation.where))
    return out


def training_tasks_of(model_spec: str) -> list[str] | None:
    """The tasks a model was trained on, from its run's summary.json (RUN/model or RUN/adapter -> RUN)."""
    p = Path(str(model_spec))
    for summary in (p.parent / "summary.json", p / "summary.json"):
        if p.is_dir() and summary.is_file():
            try:
                tasks = json.loads(summary.read_text()).get("tasks")
            except (OSError, json.JSONDecodeError):
                return None
            return [str(t) for t in tasks] if isinstance(tasks, list) else None
    return None
