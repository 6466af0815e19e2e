"""`run_audit`: the orchestration behind `sftlab audit` and the run's audit stage (collect the examples,
resume what a previous run finished, score the rest chunk by chunk, verdicts, the final files), and its table.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ..config import AuditConfig
from ..config import DataConfig
from ..data.pipeline import DataReport, record_progress
from ..data.split import load_clusters
from ..data.template import resolve_template
from ..io import output_lock, progress, table_console
from ..lm import base_model
from ..modelcheck import scoring_attention
from . import store
from .items import collect_items
from .scoring import Scorer, build_chunks, check_head_only, run_chunk
from .verdicts import VERDICTS, example_verdict, task_verdicts


def print_task_table(summary: dict, console: Console) -> None:
    def f(v, nd=2):
        return "-" if v is None else f"{v:.{nd}f}"

    few = summary["few_shot"]
    t = Table(title="sftlab audit: what the base model already knows, per task")
    for col in ("task", "n", "resp tok", "s_cond p50", "s_uncond p50", "IFD p50", "IFD>1"):
        t.add_column(col, justify="left" if col == "task" else "right")
    if few:
        t.add_column(f"{few}-shot ratio", justify="right")
    has_gen = summary["overall"]["exact_match"] is not None
    if has_gen:
        t.add_column("EM", justify="right")
        t.add_column("ROUGE-L", justify="right")
        if few:
            t.add_column(f"{few}-shot EM", justify="right")
    t.add_column("verdict")
    t.add_column("reason", overflow="fold")
    style = {"known": "green", "latent": "yellow", "unknown": "red"}
    entries = list(summary["tasks"].items())
    if len(entries) > 1:
        entries.append(("ALL", summary["overall"]))
    for name, s in entries:
        if name == "ALL":
            t.add_section()
        cells = [name, str(s["n"]), f(s["n_response_tokens"], 0), f((s["s_cond"] or {}).get("p50")),
                 f((s["s_uncond"] or {}).get("p50")), f((s["ifd"] or {}).get("p50")),
                 "-" if s["share_ifd_gt_1"] is None else f"{s['share_ifd_gt_1']:.0%}"]
        if few:
            cells.append(f(s["shot_ratio"]))
        if has_gen:
            cells += [f(s["exact_match"]), f(s["rouge_l"])]
            if few:
                cells.append(f(s["exact_match_shot"]))
        cells += [f"[{style[s['verdict']]}]{s['verdict']}[/]", s["reason"]]
        t.add_row(*cells)
    console.print(t)
    console.print(f"[dim]verdict thresholds: {summary['thresholds_text']}[/]", highlight=False)


def run_audit(inputs: list, out_dir: str | Path, cfg: AuditConfig, data: DataConfig, model_path: str = "default",
              overwrite: bool = False, console: Console | None = None, model=None, tokenizer=None,
              table: Console | None = None, on_chunk: Callable[[int, list[dict]], None] | None = None) -> dict:
    """Audit `inputs` with the model at `model_path` into `out_dir`; returns the tasks summary (also in tasks.json).

    Progress and the summary line go to `console` (stderr), the per-task table to `table` (stdout).
    `model`/`tokenizer` may be passed already loaded (tests, benchmarks); `model_path` is then only a label.
    `overwrite` discards earlier results in `out_dir` instead of resuming them. `on_chunk(k, rows)` is called
    after chunk k's rows are saved to the partial files (progress hooks; an exception there interrupts the
    audit exactly as a kill would, after a saved chunk). One process writes `out_dir` at a time.
    """
    with output_lock(Path(out_dir)):
        return _audit(inputs, out_dir, cfg, data, model_path, overwrite, console, model, tokenizer, table, on_chunk)


def _audit(inputs, out_dir, cfg, data, model_path, overwrite, console, model, tokenizer, table, on_chunk) -> dict:
    from ..models import load_model, load_tokenizer, resolve_model

    console = console or Console(stderr=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    tokenizer = tokenizer or load_tokenizer(model_path)
    resolved = "(in memory)" if model is not None else str(resolve_model(model_path).resolve())
    tmpl = resolve_template(data.template, tokenizer)
    report = DataReport()
    with record_progress(inputs, console, "read") as tick:
        items = collect_items(inputs, tokenizer, data, cfg.limit_per_task, cfg.seed, report, tick)
    if not items:
        raise ValueError("no example to audit: every record was invalid or dropped")
    config = store.audit_config(inputs, cfg, data, model_path, resolved)
    done, embs = store.load_previous(out_dir, items, config, overwrite)
    meta = {"config": config, "status": "running", "data_report": report.as_dict()}
    store.write_meta(out_dir, meta)
    pending = [it for it in items if it.index not in done]
    scored_tokens, t_score = 0, 0.0
    if pending:
        if model is None:  # bf16: bf16 weights, as training's bf16 path (fp32 stays the exact default)
            model = load_model(model_path, dtype=cfg.dtype)
        chunks = build_chunks(pending, items, tokenizer, tmpl, data, cfg)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        scorer = Scorer(model.eval(), pad, cfg.dtype, attention=scoring_attention(model))
        meta["response_positions_only"] = check_head_only(scorer, chunks[0].jobs[0])
        meta["scoring_attention"] = scorer.attention or base_model(model).config._attn_implementation
        total = sum(c.tokens for c in chunks)
        t0 = time.perf_counter()
        with progress("audit", console) as bar, \
                open(out_dir / store.PARTIAL_ROWS, "a", encoding="utf-8") as fp:
            task = bar.add_task("audit", total=total, info=f"tokens, {len(done)}/{len(items)} examples")
            for k, chunk in enumerate(chunks):
                rows, pooled = run_chunk(chunk, scorer, tokenizer, tmpl, cfg, lambda n: bar.advance(task, n))
                embs.update(store.save_chunk(out_dir, k, rows, pooled, fp))
                done.update({r["index"]: r for r in rows})
                bar.update(task, info=f"tokens, {len(done)}/{len(items)} examples")
                if on_chunk:
                    on_chunk(k, rows)
        t_score = time.perf_counter() - t0
        scored_tokens = total
    rows = [done[it.index] for it in items]
    for r in rows:
        r["verdict"] = example_verdict(r, cfg)
    summary = task_verdicts(rows, cfg, cfg.few_shot)
    store.write_final(out_dir, rows, np.stack([embs[it.index] for it in items]), summary)
    wall = time.perf_counter() - t_start
    meta.update(status="complete", n_examples=len(items), resumed=len(items) - len(pending),
                scored=len(pending), tokens_scored=scored_tokens, scoring_s=round(t_score, 3),
                tokens_per_s=round(scored_tokens / t_score, 1) if t_score else None, wall_s=round(wall, 3),
                task_map_clusters=load_clusters(data.task_map) or None)
    store.write_meta(out_dir, meta)
    store.remove_partial(out_dir)
    print_task_table(summary, table or (Console(quiet=True) if console.quiet else table_console()))
    counts = Counter(s["verdict"] for s in summary["tasks"].values())
    console.print(f"[green]done[/] audited {len(items):,} examples in {len(summary['tasks'])} tasks "
                  f"({len(items) - len(pending):,} resumed, {scored_tokens:,} tokens scored in {wall:.0f} s"
                  + (f", {scored_tokens / t_score:,.0f} tokens/s" if t_score else "") + "); tasks: "
                  + ", ".join(f"{counts[v]} {v}" for v in VERDICTS) + f" -> {out_dir}", highlight=False)
    return summary
