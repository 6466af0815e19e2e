"""`data inspect` statistics and `data tokenize` output, with progress bars and one-line summaries."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..io import atomic_write, table_console
from ..config import DataConfig
from .answers import answer_distribution, answer_warning, counted_distribution, degenerate
from .pipeline import DataReport, iter_examples, record_progress
from .tokenize import IGNORE


def _summary_line(report: DataReport, extra: str = "") -> str:
    parts = [f"{report.kept:,} examples kept of {report.records:,} records"]
    if report.invalid.total:
        parts.append(f"{report.invalid.total:,} invalid skipped " +
                     ", ".join(f"{k}={v}" for k, v in report.invalid.counts.most_common()))
    if report.duplicates:
        parts.append(f"{report.duplicates:,} duplicates" + (" dropped" if report.duplicates_dropped else ""))
    if report.truncated:
        parts.append(f"{report.truncated:,} truncated")
    if report.dropped:
        parts.append("dropped " + ", ".join(f"{k}={v}" for k, v in report.dropped.items()))
    return "; ".join(parts) + (f"; {extra}" if extra else "")


def tokenize_to_file(inputs, model: str, opts: DataConfig, out: Path, console: Console) -> DataReport:
    from ..models import load_tokenizer

    tokenizer = load_tokenizer(model)
    report = DataReport()
    t0 = time.perf_counter()
    with record_progress(inputs, console, "tokenize") as tick, atomic_write(out) as f:
        for ex in iter_examples(inputs, tokenizer, opts, report, on_record=tick):
            row = {"task": ex.task, "input_ids": ex.input_ids, "labels": ex.labels}
            if ex.weights is not None:
                row["weights"] = ex.weights
            f.write(json.dumps(row, separators=(",", ":")) + "\n")
    dt = time.perf_counter() - t0
    console.print(f"[green]done[/] {_summary_line(report, f'{report.kept / max(dt, 1e-9):,.0f} examples/s')} -> {out}",
                  highlight=False, soft_wrap=True)
    return report


def percentiles(values) -> dict:
    if len(values) == 0:
        return {}
    a = np.asarray(values)
    return {"min": int(a.min()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": int(a.max()), "mean": float(a.mean())}


def inspect_data(inputs, model: str, opts: DataConfig, console: Console, as_json: bool = False) -> dict:
    """`data inspect`: with data.cache, the statistics of the prepared-data entry training uses (built if missing),
    else of one streamed pass."""
    from ..models import load_tokenizer

    tokenizer = load_tokenizer(model)
    report, lengths, trained, dists, sample = (_from_prepared if opts.cache else _streamed)(inputs, tokenizer, opts,
                                                                                            console)
    n_tokens, n_trained = int(lengths.sum()), int(trained.sum())
    stats = report.as_dict()
    stats.update({
        "tokens": n_tokens, "trained_tokens": n_trained,
        "trained_fraction": n_trained / n_tokens if n_tokens else 0.0,
        "length": percentiles(lengths), "response_length": percentiles(trained),
        "template": opts.template, "loss_on": opts.loss_on, "max_length": opts.max_length,
        "train_reasoning": opts.train_reasoning,
    })
    stats["answer_distributions"] = {t: d for t, d in sorted(dists.items()) if d}
    stats["answer_warnings"] = [answer_warning(t, d) for t, d in stats["answer_distributions"].items()
                                if degenerate(d)]
    if as_json:
        print(json.dumps(stats, indent=2))
    else:
        _print_inspect(stats, report, sample, tokenizer, console)
    extra = f"{n_tokens:,} tokens, {stats['trained_fraction']:.1%} trained"
    console.print(f"[green]done[/] {_summary_line(report, extra)}", highlight=False, soft_wrap=True)
    return stats


def _trained(ex) -> int:
    """Trained tokens of an example (with prompt_loss_weight: the tokens of full weight)."""
    return sum(1 for x in ex.labels if x != IGNORE) if ex.weights is None else sum(w == 1.0 for w in ex.weights)


def _streamed(inputs, tokenizer, opts: DataConfig, console: Console):
    from .prepared import last_answer

    report = DataReport()
    lengths, trained = [], []
    sample = None
    references: dict[str, list[str]] = defaultdict(list)
    with record_progress(inputs, console, "inspect") as tick:
        for ex, conv in iter_examples(inputs, tokenizer, opts, report, on_record=tick, with_conversation=True):
            if (answer := last_answer(conv)) is not None:
                references[str(conv.task)].append(answer)
            lengths.append(len(ex.input_ids))
            trained.append(_trained(ex))
            sample = sample or ex
    dists = {t: answer_distribution(r) for t, r in references.items()}
    return report, np.asarray(lengths, dtype=np.int64), np.asarray(trained, dtype=np.int64), dists, sample


def _from_prepared(inputs, tokenizer, opts: DataConfig, console: Console):
    """The statistics from a prepared-data entry: lengths from its offsets, trained tokens from its mask (or
    weights), answer distributions from the answer counts it recorded while it was built."""
    from .prepared import prepare, prepared_line, trained_counts

    built = prepare(inputs, tokenizer, opts, console, label="inspect")
    console.print(prepared_line(built), highlight=False, soft_wrap=True)
    p = built.prepared
    dists = {t: counted_distribution(Counter(a["counts"]), a["n"]) if a["counts"] is not None else None
             for t, a in p.meta["answers"].items()}
    return p.report(), p.lengths, trained_counts(p), dists, (p[0] if len(p) else None)


def render_trained(ex, tokenizer) -> Text:
    """The example's text with trained tokens highlighted."""
    text = Text()
    for tok, lab in zip(ex.input_ids, ex.labels):
        piece = tokenizer.decode([tok])
        text.append(piece, style="bold black on green" if lab != IGNORE else "dim")
    return text


def _print_inspect(stats: dict, report: DataReport, sample, tokenizer, console: Console) -> None:
    out = table_console()
    t = Table(title="sftlab data inspect", show_header=False)
    t.add_row("records / kept", f"{stats['records']:,} / {stats['kept']:,}")
    t.add_row("formats", ", ".join(f"{k}: {v:,}" for k, v in stats["formats"].items()))
    t.add_row("tasks", f"{len(stats['tasks'])}")
    for name in ("length", "response_length"):
        p = stats[name]
        if p:
            t.add_row(f"{name} (tokens)", f"p50 {p['p50']:.0f}  p90 {p['p90']:.0f}  p99 {p['p99']:.0f}  max {p['max']}")
    t.add_row("trained tokens", f"{stats['trained_tokens']:,} of {stats['tokens']:,} ({stats['trained_fraction']:.1%})")
    t.add_row("duplicates", f"{stats['duplicates']:,}" + (" (dropped)" if stats["duplicates_dropped"] else ""))
    t.add_row("truncated / dropped", f"{stats['truncated']:,} / {sum(stats['dropped'].values()):,} {stats['dropped'] or ''}")
    t.add_row("invalid", f"{stats['invalid']['total']:,} {stats['invalid']['by_reason'] or ''}")
    if stats["reasoning_turns"] or stats["tool_call_turns"]:
        t.add_row("reasoning / tool calls", f"{stats['reasoning_turns']:,} turns with a reasoning trace "
                                            f"({'trained' if stats['train_reasoning'] else 'context only'}) / "
                                            f"{stats['tool_call_turns']:,} tool-call turns (trained)")
    h = stats["history_rewrites"]
    if h["conversations"]:
        t.add_row("history rewrites", f"{h['conversations']:,} conversations as {h['extra_examples']:,} extra examples "
                                      f"(+{h['extra_tokens']:,} tokens, {h['extra_tokens'] / max(stats['tokens'], 1):.1%}"
                                      f" of all): each turn in its own inference context")
    out.print(t)
    if len(stats["tasks"]) > 1:
        tt = Table(title="examples per task")
        tt.add_column("task")
        tt.add_column("examples", justify="right")
        for task, n in sorted(stats["tasks"].items(), key=lambda kv: -kv[1]):
            tt.add_row(str(task), f"{n:,}")
        out.print(tt)
    if stats["answer_distributions"]:
        at = Table(title="answers from a small set (classification-like tasks): the majority baseline is the exact "
                         "match of always giving the commonest")
        for col in ("task", "n", "answers", "commonest", "majority baseline"):
            at.add_column(col, justify="left" if col in ("task", "commonest") else "right")
        for task, d in stats["answer_distributions"].items():
            at.add_row(escape(task), f"{d['n']:,}", str(len(d["labels"])), escape(d["majority"]),
                       f"{d['majority_baseline']:.0%}" + (" [yellow](!)[/]" if degenerate(d) else ""))
        out.print(at)
    for line in stats["answer_warnings"]:
        out.print(f"[bold yellow]warning:[/] {escape(line)}", highlight=False)
    for line in report.invalid.examples[:5]:
        out.print(f"[yellow]invalid[/] {line}", highlight=False)
    if report.special_text:
        out.print("[bold yellow]warning:[/] data text contains control-token strings (kept as plain text, never as "
                  "control tokens): " + ", ".join(f"{k!r} x{v}" for k, v in report.special_text.items()), highlight=False)
    if sample is not None:
        out.print("[bold]first example[/] (trained tokens highlighted):")
        out.print(render_trained(sample, tokenizer))
