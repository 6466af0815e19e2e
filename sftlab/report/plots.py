"""Report figures: matplotlib (Agg backend, no display) rendered to base64 PNG for inline `<img>` tags.

Every function takes plain data and returns the PNG as a base64 string (None when there is nothing to
plot), so the HTML stays self-contained and the figures are testable without a browser.
"""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # never a GUI backend: reports are built on headless machines
import matplotlib.pyplot as plt  # noqa: E402

MAX_LEGEND = 20


def png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _task_colors(tasks: list[str]) -> dict[str, tuple]:
    cmap, n = (plt.get_cmap("tab10"), 10) if len(tasks) <= 10 else (plt.get_cmap("tab20"), 20)
    return {t: cmap(i % n) for i, t in enumerate(tasks)}


def audit_scatter(rows: list[dict]) -> str | None:
    """s_cond (NLL of the response given the instruction) against s_uncond (without it), one colour per task.
    Points below the diagonal are examples whose instruction helps (ifd < 1)."""
    pts = [(r["s_uncond"], r["s_cond"], str(r.get("task"))) for r in rows
           if isinstance(r.get("s_cond"), (int, float)) and isinstance(r.get("s_uncond"), (int, float))]
    if not pts:
        return None
    tasks = sorted({t for _, _, t in pts})
    colors = _task_colors(tasks)
    fig, ax = plt.subplots(figsize=(7, 5.5))
    for t in tasks:
        xs = [x for x, _, tt in pts if tt == t]
        ys = [y for _, y, tt in pts if tt == t]
        ax.scatter(xs, ys, s=10, alpha=0.6, color=colors[t], label=t)
    lo = min(min(p[0], p[1]) for p in pts)
    hi = max(max(p[0], p[1]) for p in pts)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="s_cond = s_uncond")
    ax.set_xlabel("s_uncond: response NLL without the instruction (nats/token)")
    ax.set_ylabel("s_cond: response NLL given the instruction")
    if len(tasks) <= MAX_LEGEND:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    return png_base64(fig)


def loss_curves(runs: dict[str, list[dict]]) -> str | None:
    """Training loss (solid) and validation loss (dashed markers) against step, one colour per run."""
    series = {name: rows for name, rows in runs.items() if any("loss" in r or "eval_loss" in r for r in rows)}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cmap = plt.get_cmap("tab10")
    for i, (name, rows) in enumerate(series.items()):
        train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float)) and "step" in r]
        ev = [(r["step"], r["eval_loss"]) for r in rows if isinstance(r.get("eval_loss"), (int, float)) and "step" in r]
        if train:
            ax.plot(*zip(*train), color=cmap(i % 10), lw=1.2, label=f"{name} train")
        if ev:
            ax.plot(*zip(*ev), color=cmap(i % 10), ls="--", marker="o", ms=4, label=f"{name} eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_base64(fig)


def task_bars(tasks: dict[str, dict], metric: str, label: str) -> str | None:
    """Before (base) / after (model) bars per task, in panels for tasks seen and unseen in training.

    `tasks`: {task: {"base": float | None, "model": float | None, "seen": bool | None}}."""
    tasks = {t: v for t, v in tasks.items() if v.get("model") is not None}
    if not tasks:
        return None
    groups = {"seen in training": [t for t, v in tasks.items() if v.get("seen") is True],
              "unseen in training": [t for t, v in tasks.items() if v.get("seen") is False],
              "all tasks": [t for t, v in tasks.items() if v.get("seen") is None]}
    groups = {k: v for k, v in groups.items() if v}
    widths = [max(len(v), 2) for v in groups.values()]
    fig, axes = plt.subplots(1, len(groups), figsize=(min(16, 2.5 + 0.55 * sum(widths)), 4.2), squeeze=False,
                             gridspec_kw={"width_ratios": widths}, sharey=True)
    for ax, (title, names) in zip(axes[0], groups.items()):
        xs = range(len(names))
        base = [tasks[t].get("base") for t in names]
        if any(b is not None for b in base):
            ax.bar([x - 0.2 for x in xs], [b if b is not None else 0 for b in base], width=0.4, color="#9aa5b1",
                   label="base (before)")
        ax.bar([x + 0.2 for x in xs], [tasks[t]["model"] for t in names], width=0.4, color="#2f6fb3",
               label="model (after)")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(label)
    axes[0][-1].legend(fontsize=8)
    return png_base64(fig)


def tradeoff(points: list[dict], xlabel: str = "forgetting: Δ general-probe gold-answer NLL (nats, higher = more "
                                                   "forgotten)") -> str | None:
    """Task gain against forgetting, one point per run, with 95 % CI error bars.

    `points`: [{"name", "forgetting", "forgetting_ci": [lo, hi], "gain", "gain_ci": [lo, hi], "pareto": bool}];
    Pareto-front points are stars joined by a dashed line."""
    points = [p for p in points if p.get("gain") is not None and p.get("forgetting") is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 5))
    cmap = plt.get_cmap("tab10")
    for i, p in enumerate(points):
        xerr = [[p["forgetting"] - p["forgetting_ci"][0]], [p["forgetting_ci"][1] - p["forgetting"]]]
        yerr = [[p["gain"] - p["gain_ci"][0]], [p["gain_ci"][1] - p["gain"]]]
        ax.errorbar([p["forgetting"]], [p["gain"]], xerr=xerr, yerr=yerr, fmt="*" if p.get("pareto") else "o",
                    markersize=11 if p.get("pareto") else 6, color=cmap(i % 10), capsize=3)
        ax.annotate(p["name"], (p["forgetting"], p["gain"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    front = sorted((p for p in points if p.get("pareto")), key=lambda p: p["forgetting"])
    if len(front) > 1:  # the Pareto front, from least forgetting to most gain
        ax.plot([p["forgetting"] for p in front], [p["gain"] for p in front], "--", color="grey", lw=1,
                label="Pareto front")
        ax.legend(loc="lower right", fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("task gain: −Δ macro task NLL (nats, higher = better)")
    ax.grid(alpha=0.3)
    return png_base64(fig)
