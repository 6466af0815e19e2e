"""Generalisation: per-task metrics on task data (held-out instances and held-out tasks, as written by
`sftlab data split`, see `sftlab.data.split`), their deltas and the few-shot prompting baseline.

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

from .. import layout
from ..data.fewshot import shot_conversation
from ..data.formats import Conversation
from ..data.load import expand_paths
from ..config import DataConfig
from ..data.pipeline import DataReport, encode_conversations, iter_conversations, iter_examples, keep_examples
from ..data.template import resolve_template
from ..data.answers import answer_distribution, degenerate
from ..data.tokenize import Example, protected_pattern
from ..lm import GEN_MARGIN
from .metrics import exact_match, labels_of, normalise_answer, paired_bootstrap_ci, predict_label, rouge_l

METRICS = ("nll", "exact_match", "rouge_l", "accuracy")


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


def load_task_items(inputs: list[str], tokenizer, opts: DataConfig, limit: int | None = None,
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
    protected = protected_pattern(tokenizer)
    for path in expand_paths(inputs):
        convs = sample_records(iter_conversations([path], opts, report, protected.findall, on_record), limit,
                               f"{seed}:{path.name}")
        encoded = encode_conversations(convs, tokenizer, tmpl, opts, protected)
        for conv, ex in keep_examples(encoded, opts.skip_invalid, report):
            items.append(TaskItem(str(conv.where), str(conv.task), ex, conv))
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
    """Per task: `metrics.label_set` of its references (None: accuracy does not apply)."""
    return label_sets(task_answer_distributions(items, max_labels))


def label_sets(answers: dict[str, dict | None]) -> dict[str, list[str] | None]:
    """The label sets of `task_answer_distributions`."""
    return {t: labels_of(d) for t, d in answers.items()}


def score_task_rows(items: list[TaskItem], nlls, generations: list[str],
                    labels: dict[str, list[str] | None]) -> list[dict]:
    """Per example (`where` = FILE:LINE, its reference): task, nll (mean nats/token), tokens, exact_match, rouge_l,
    correct (None: no label set), generation."""
    rows = []
    for it, nll, gen in zip(items, nlls, generations, strict=True):
        lab = labels.get(it.task)
        correct = None
        if lab is not None:
            correct = float(predict_label(gen, lab) == normalise_answer(it.reference))
        rows.append({"where": it.where, "task": it.task, "reference": it.reference, "nll": nll.mean,
                     "tokens": nll.tokens,
                     "exact_match": float(exact_match(gen, it.reference)), "rouge_l": rouge_l(gen, it.reference),
                     "correct": correct, "generation": gen})
    return rows


def _metric_values(rows: list[dict], metric: str) -> list[float | None]:
    key = "correct" if metric == "accuracy" else metric
    return [r[key] for r in rows]


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def task_answer_distributions(items: list[TaskItem], max_labels: int = 20) -> dict[str, dict | None]:
    """Per task: `answers.answer_distribution` of its references (None where they are free text)."""
    refs: dict[str, list[str]] = defaultdict(list)
    for it in items:
        refs[it.task].append(it.reference)
    return {t: answer_distribution(r, max_labels) for t, r in sorted(refs.items())}


def summarise_tasks(rows: list[dict], training_tasks: list[str] | None,
                    answers: dict[str, dict | None] | None = None) -> dict:
    """{"tasks": {task: {n, seen, nll, exact_match, rouge_l, accuracy, majority_baseline, degenerate}},
    "macro": {"all"|"seen"|"unseen": ...}}; with `answers` (`task_answer_distributions`), each task's majority
    baseline (None for free-text answers) and whether it is single-label or imbalanced, and per macro group
    the mean majority baseline and the number of such degenerate tasks."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    seen = set(training_tasks) if training_tasks is not None else None
    tasks = {}
    for t in sorted(by_task):
        rs = by_task[t]
        tasks[t] = {"n": len(rs), "seen": None if seen is None else t in seen,
                    **{m: _mean(_metric_values(rs, m)) for m in METRICS}}
        if answers is not None:
            dist = answers.get(t)
            tasks[t].update(majority_baseline=dist["majority_baseline"] if dist else None, degenerate=degenerate(dist))
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
    if "majority_baseline" in chosen[0]:
        out["majority_baseline"] = _mean(v["majority_baseline"] for v in chosen)
        out["degenerate_tasks"] = sum(v["degenerate"] for v in chosen)
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
        out.append(shot_conversation(it.conversation, [items[j].conversation for j in demos]))
    return out


def training_tasks_of(model_spec: str) -> list[str] | None:
    """The tasks a model was trained on, from its training's summary.json (OUT/model or OUT/adapter -> OUT)."""
    summary = layout.training_summary_of(Path(str(model_spec)))
    if summary is None:
        return None
    try:
        tasks = json.loads(summary.read_text()).get("tasks")
    except (OSError, json.JSONDecodeError):
        return None
    return [str(t) for t in tasks] if isinstance(tasks, list) else None
