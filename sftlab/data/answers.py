"""Answers as a set: normalisation (the one `exact_match` and accuracy use) and the distribution of a task's
reference answers, so an accuracy is never read without its baseline.

Where a task's references come from a small set (a classification-like task), always answering the most common
one scores `majority_baseline` in exact match and accuracy; a task whose references are one label only (or almost)
measures little more than that. `data inspect` and `eval` report it and warn.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable

IMBALANCED_SHARE = 0.8  # a task whose most common answer is at least this share of its references is imbalanced


def normalise_answer(text: str) -> str:
    """Lowercase, drop punctuation (ASCII and Unicode), collapse whitespace; numbers keep their sign and decimal
    point ("-5" is not "5", "3.5" is not "35")."""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2212", "-")  # minus sign
    kept = []
    for i, ch in enumerate(text):
        if ch.isspace():
            kept.append(" ")
        elif not unicodedata.category(ch).startswith("P") or _numeric_mark(text, i):
            kept.append(ch)
    return " ".join("".join(kept).split())


def _numeric_mark(text: str, i: int) -> bool:
    """A sign before a number ("-5" at a word start) or a decimal point between digits ("3.5")."""
    ch, prev = text[i], text[i - 1] if i else " "
    nxt = text[i + 1] if i + 1 < len(text) else " "
    if ch == "-":
        return nxt.isdigit() and (prev.isspace() or i == 0 or prev in "([{")
    return ch == "." and prev.isdigit() and nxt.isdigit()


def answer_distribution(references: Iterable[str], max_labels: int = 20) -> dict | None:
    """The distribution of a task's normalised references where they form a small set — 1 to `max_labels`
    distinct answers, each used twice on average (distinct <= n / 2), so free-text answers do not count — else
    None: {"n", "labels": {answer: count}, most common first, "majority": that answer, "majority_baseline": its
    share (the exact match and accuracy of always giving it), "single_label", "imbalanced" (share >=
    IMBALANCED_SHARE)}."""
    refs = [normalise_answer(r) for r in references]
    return counted_distribution(Counter(r for r in refs if r), len(refs), max_labels)


def counted_distribution(counts: Counter, n: int, max_labels: int = 20) -> dict | None:
    """`answer_distribution` from the counts of the non-empty normalised references among `n` references."""
    if not counts or len(counts) > max_labels or len(counts) > n / 2:
        return None
    majority, k = counts.most_common(1)[0]
    share = k / n
    return {"n": n, "labels": dict(counts.most_common()), "majority": majority, "majority_baseline": share,
            "single_label": len(counts) == 1, "imbalanced": share >= IMBALANCED_SHARE}


def degenerate(dist: dict | None) -> bool:
    """Single-label or imbalanced: accuracy there says little beyond the majority baseline."""
    return bool(dist) and (dist["single_label"] or dist["imbalanced"])


def answer_warning(task: str, dist: dict) -> str:
    """One line saying why a task's accuracy needs its baseline."""
    top = dist["labels"][dist["majority"]]
    kind = "one answer only" if dist["single_label"] else f"imbalanced, {len(dist['labels'])} answers"
    return (f"task {task!r}: {top} of {dist['n']} references are {dist['majority']!r} ({kind}): always answering "
            f"it scores {dist['majority_baseline']:.0%} exact match / accuracy")
