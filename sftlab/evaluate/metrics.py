"""Answer metrics for generated text: normalised exact match, containment, ROUGE-L.

Normalisation is the usual QA one minus article removal: lowercase, punctuation removed, whitespace
collapsed, so "Smith, John." and "smith john" match but "john smith" does not.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from functools import lru_cache

from ..data.answers import answer_distribution, normalise_answer  # defined with the data they describe


def _refs(reference: str | Iterable[str]) -> list[str]:
    return [reference] if isinstance(reference, str) else list(reference)


def exact_match(prediction: str, reference: str | Iterable[str]) -> bool:
    """True when the normalised prediction equals the (or any) normalised reference."""
    pred = normalise_answer(prediction)
    return any(pred == normalise_answer(r) for r in _refs(reference))


def contains_answer(prediction: str, reference: str | Iterable[str]) -> bool:
    """Lenient check: a normalised reference occurs as whole words inside the normalised prediction."""
    pred = f" {normalise_answer(prediction)} "
    return any(f" {normalise_answer(r)} " in pred for r in _refs(reference) if normalise_answer(r))


@lru_cache(maxsize=1)
def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:  # optional dependency
        raise ImportError("ROUGE-L needs the rouge-score package: pip install 'sftlab[eval]'") from e
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_UnicodeTokenizer())


class _UnicodeTokenizer:
    """rouge-score's default tokenization (lowercase, non-alphanumerics split words) for any script: its own keeps
    only [a-z0-9], so non-Latin text scored 0. CJK characters count one token each (no spaces between words)."""

    def tokenize(self, text: str) -> list[str]:
        out = []
        for ch in unicodedata.normalize("NFKC", text).lower():
            if not ch.isalnum():
                out.append(" ")
            elif unicodedata.east_asian_width(ch) in ("W", "F"):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        return "".join(out).split()


def rouge_l(prediction: str, reference: str | Iterable[str]) -> float:
    """ROUGE-L F-measure against the best-matching reference."""
    scorer = _rouge_scorer()
    return max((scorer.score(r, prediction)["rougeL"].fmeasure for r in _refs(reference)), default=0.0)


def exact_match_of_generations(rows: Iterable[dict]) -> tuple[float | None, int]:
    """(exact-match rate, number of rows with a reference) of `sftlab generate` rows ({"generation", "reference"});
    the rate is None when no row has a reference."""
    hits = [exact_match(r["generation"], r["reference"]) for r in rows if r.get("reference") is not None]
    return (sum(hits) / len(hits) if hits else None), len(hits)


# ---- label-set accuracy --------------------------------------------------------------------------------------
def label_set(references: Iterable[str], max_labels: int = 20) -> list[str] | None:
    """The task's answer labels when its references form a small closed set, else None.

    A closed set: 2 to `max_labels` distinct normalised references, and every label used twice on
    average (distinct <= n / 2), so a handful of free-text answers is not mistaken for a label set (and a
    sample holding one label only is no classification task).
    """
    return labels_of(answer_distribution(references, max_labels))


def labels_of(dist: dict | None) -> list[str] | None:
    """The label set of an `answers.answer_distribution`: its answers when there are at least two."""
    return sorted(dist["labels"]) if dist and not dist["single_label"] else None


def predict_label(prediction: str, labels: list[str]) -> str | None:
    """Map a generation onto a label: the label it equals (normalised), else the label occurring first in it
    as whole words (longest on ties), else None."""
    pred = normalise_answer(prediction)
    if pred in labels:
        return pred
    padded = f" {pred} "
    best = None
    for label in labels:
        pos = padded.find(f" {label} ")
        if pos >= 0 and (best is None or (pos, -len(label)) < best[0]):
            best = ((pos, -len(label)), label)
    return best[1] if best else None


# ---- paired bootstrap ----------------------------------------------------------------------------------------
def paired_bootstrap_ci(base: Iterable[float], tuned: Iterable[float], groups: Iterable | None = None,
                        weights: Iterable[float] | None = None, n_resamples: int = 1000, seed: int = 0,
                        confidence: float = 0.95) -> tuple[float, float, float]:
    """(delta, low, high): tuned minus base, with a percentile bootstrap confidence interval.

    Paired: one resample of example indices applies to both models. With `groups` (e.g. tasks) the
    statistic is the macro average over groups of the per-group mean difference and examples are
    resampled within their group; with `weights` the per-group means are weighted (e.g. by token counts,
    giving a per-token mean). Identical inputs give exactly (0, 0, 0). Seeded, so deterministic.
    """
    import numpy as np

    a = np.asarray(list(base), dtype=np.float64)
    b = np.asarray(list(tuned), dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired bootstrap needs two equal-length, non-empty lists (got {a.shape} and {b.shape})")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = b - a
    w = np.ones_like(d) if weights is None else np.asarray(list(weights), dtype=np.float64)
    g = np.zeros(d.size, dtype=np.int64) if groups is None else np.unique(np.asarray(list(groups), dtype=str),
                                                                          return_inverse=True)[1].ravel()
    if w.shape != d.shape or g.shape != d.shape:
        raise ValueError("groups and weights must have one entry per example")
    rng = np.random.default_rng(seed)
    point, samples = 0.0, np.zeros(n_resamples)
    members = [np.flatnonzero(g == k) for k in np.unique(g)]
    for idx in members:
        dw, ww = d[idx] * w[idx], w[idx]
        point += dw.sum() / ww.sum()
        pick = rng.integers(0, idx.size, size=(n_resamples, idx.size))
        samples += dw[pick].sum(axis=1) / ww[pick].sum(axis=1)
    point, samples = point / len(members), samples / len(members)
    tail = (1 - confidence) / 2
    low, high = np.quantile(samples, [tail, 1 - tail])
    return float(point), float(low), float(high)
