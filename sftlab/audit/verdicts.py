"""Pure statistics and verdicts over audit rows (examples.jsonl objects): per example, per task, overall.

The rules (see docs/audit.md): `known` if greedy exact match >= known_match or median s_cond <= known_nll;
else `latent` if median ifd <= latent_ratio, median shot_ratio <= latent_ratio, or few-shot exact match >=
known_match; else `unknown`. Thresholds are the `AuditConfig` fields of those names.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np

from ..config import AuditConfig

VERDICTS = ("known", "latent", "unknown")


def _vals(rows, key) -> list[float]:
    return [r[key] for r in rows if r.get(key) is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]


def _mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _median(values) -> float | None:
    return float(np.median(values)) if len(values) else None


def quantiles(values) -> dict | None:
    if not len(values):
        return None
    a = np.asarray(values, dtype=np.float64)
    q = np.percentile(a, [10, 25, 50, 75, 90])
    return {"mean": float(a.mean()), **{f"p{p}": float(x) for p, x in zip((10, 25, 50, 75, 90), q)}}


def verdict(s_cond: float | None, ifd: float | None, th: AuditConfig, exact: float | None = None,
            shot_ratio: float | None = None, exact_shot: float | None = None) -> tuple[str, str]:
    """(verdict, reason) from one example's numbers or a task's aggregates (median NLLs/ratios, mean matches)."""
    if exact is not None and exact >= th.known_match:
        return "known", f"greedy EM {exact:.2f} >= {th.known_match:.2f}"
    if s_cond is not None and s_cond <= th.known_nll:
        return "known", f"s_cond {s_cond:.2f} <= {th.known_nll:.2f}"
    if ifd is not None and ifd <= th.latent_ratio:
        return "latent", f"IFD {ifd:.2f} <= {th.latent_ratio:.2f}"
    if shot_ratio is not None and shot_ratio <= th.latent_ratio:
        return "latent", f"few-shot ratio {shot_ratio:.2f} <= {th.latent_ratio:.2f}"
    if exact_shot is not None and exact_shot >= th.known_match:
        return "latent", f"few-shot EM {exact_shot:.2f} >= {th.known_match:.2f}"
    parts = [f"s_cond {s_cond:.2f} > {th.known_nll:.2f}" if s_cond is not None else None,
             f"IFD {ifd:.2f} > {th.latent_ratio:.2f}" if ifd is not None else None,
             f"few-shot ratio {shot_ratio:.2f} > {th.latent_ratio:.2f}" if shot_ratio is not None else None]
    return "unknown", ", ".join(p for p in parts if p) or "no measurements"


def example_verdict(row: dict, th: AuditConfig) -> str:
    return verdict(row.get("s_cond"), row.get("ifd"), th, row.get("exact_match"), row.get("shot_ratio"),
                   row.get("exact_match_shot"))[0]


def task_stats(rows: list[dict], th: AuditConfig) -> dict:
    """Aggregates and verdict for one group of example rows."""
    s_cond, ifd = _vals(rows, "s_cond"), _vals(rows, "ifd")
    stats = {
        "n": len(rows), "n_response_tokens": _mean(_vals(rows, "n_response_tokens")),
        "s_cond": quantiles(s_cond), "s_uncond": quantiles(_vals(rows, "s_uncond")), "ifd": quantiles(ifd),
        "share_ifd_gt_1": _mean([float(x > 1) for x in ifd]),
        "n_shot": len(_vals(rows, "s_cond_shot")), "s_cond_shot": _median(_vals(rows, "s_cond_shot")),
        "shot_ratio": _median(_vals(rows, "shot_ratio")),
        "exact_match": _mean(_vals(rows, "exact_match")), "rouge_l": _mean(_vals(rows, "rouge_l")),
        "exact_match_shot": _mean(_vals(rows, "exact_match_shot")),
        "verdicts": dict(Counter(example_verdict(r, th) for r in rows)),
    }
    stats["verdict"], stats["reason"] = verdict(_median(s_cond), _median(ifd), th, stats["exact_match"],
                                                stats["shot_ratio"], stats["exact_match_shot"])
    return stats


def thresholds(th: AuditConfig) -> dict:
    return {"known_match": th.known_match, "known_nll": th.known_nll, "latent_ratio": th.latent_ratio}


def describe_thresholds(th: AuditConfig) -> str:
    return (f"known: greedy exact match >= {th.known_match:.2f} or median s_cond <= {th.known_nll:.2f} "
            f"nats/token; latent: median IFD or few-shot ratio <= {th.latent_ratio:.2f}, or few-shot exact "
            f"match >= {th.known_match:.2f}; unknown: otherwise")


def task_verdicts(rows: list[dict], th: AuditConfig, few_shot: int = 0) -> dict:
    """tasks.json: the thresholds, and per task and overall the statistics and verdict of its rows."""
    by_task: dict = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    return {"thresholds": thresholds(th), "thresholds_text": describe_thresholds(th), "few_shot": few_shot,
            "tasks": {str(t): task_stats(rs, th) for t, rs in sorted(by_task.items(), key=lambda kv: str(kv[0]))},
            "overall": task_stats(rows, th)}
