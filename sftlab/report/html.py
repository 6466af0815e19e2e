"""`sftlab report`: one self-contained static HTML file for one or more runs.

What it reads from each RUN_DIR (every part optional; a missing part is shown as "not available"):
- `summary.json` and `metrics.jsonl` (training: `step, loss` and `step, eval_loss` lines);
- `audit/examples.jsonl` + `audit/tasks.json` (`sftlab audit`), or the directory itself if it is one;
- `eval/metrics.json` (`sftlab eval`, schema in `sftlab.evaluate.evaluate`), or `metrics.json` in the directory.

Sections (ids): `overview`, `audit` (table + s_cond vs s_uncond scatter), `loss` (curves), `tasks`
(per-task before/after bars split seen/unseen, table with CIs, prompting baseline), `forgetting` (table
with CIs), `tradeoff` (task gain vs forgetting, from two runs on), `generations` (side by side).
No network resources, no scripts: figures are inline base64 PNGs; all text from data and files is
HTML-escaped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from .. import layout
from ..evaluate.forgetting import FORMAT_INDEPENDENT, FORMAT_SENSITIVE, QA_METRICS, QA_PERCENT, headline_measure
from ..io import progress, read_jsonl
from . import plots

SECTIONS = ("headline", "overview", "audit", "loss", "tasks", "ifeval", "forgetting", "tradeoff", "generations")
MAX_TEXT = 2000  # characters of a prompt or generation shown

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#1d2733;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:2px solid #d8dee6;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}th,td{border:1px solid #d8dee6;padding:.25em .55em;vertical-align:top}
th{background:#f1f4f8;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.text{white-space:pre-wrap;max-width:30em;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em}
.muted{color:#6b7785}.good{color:#18794e}.bad{color:#b42318}img{max-width:100%;border:1px solid #eef1f5}
nav a{margin-right:1em}.verdict-known{color:#18794e}.verdict-latent{color:#b54708}.verdict-unknown{color:#b42318}
"""


@dataclass
class Run:
    name: str
    path: Path
    summary: dict | None = None
    train_log: list[dict] = field(default_factory=list)
    audit_rows: list[dict] = field(default_factory=list)
    audit_tasks: dict | None = None
    audit_dir: Path | None = None  # where the audit was found (the run's own, or linked: `linked_audits`)
    eval: dict | None = None
    eval_rows: list[dict] = field(default_factory=list)  # the eval's task rows (examples.jsonl), model and base


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


def linked_audits(path: Path, eval_metrics: dict | None) -> list[Path]:
    """Audits a run's training data came from, wherever they were written: the training's config (the run's own
    training dir, or the one that wrote the evaluated model) names its data files, and a file `sftlab select`
    wrote has FILE.summary.json beside it naming its `audit_dir`."""
    import yaml

    train_dirs = [path / layout.TRAIN_DIR, path]
    if eval_metrics and eval_metrics.get("model"):
        summary = layout.training_summary_of(Path(eval_metrics["model"]))
        if summary is not None:
            train_dirs.append(summary.parent)
    found = []
    for d in train_dirs:
        try:
            cfg = yaml.safe_load((d / layout.TRAIN_CONFIG).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue
        for f in (cfg.get("data") or {}).get("train") or []:
            summary = _read_json(layout.selection_summary(Path(f)))
            if isinstance(summary, dict) and summary.get("audit_dir"):
                found.append(Path(summary["audit_dir"]))
    return found


def load_run(path: str | Path, parts: tuple[str, ...] = ("train", "audit", "eval")) -> Run:
    """What `path` holds of `parts`: a training output dir, an audit or eval directory, or a run directory
    (`sftlab run`: RUN/train, RUN/audit, RUN/eval; file names from `sftlab.layout`)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run directory")
    run = Run(path.name or str(path), path)
    if "train" in parts:
        train_dir = path / layout.TRAIN_DIR
        if (path / layout.TRAIN_SUMMARY).is_file() or not train_dir.is_dir():
            train_dir = path
        run.summary = _read_json(train_dir / layout.TRAIN_SUMMARY)
        run.train_log = read_jsonl(train_dir / layout.TRAIN_METRICS)
    for ev in (path / layout.EVAL_DIR / layout.EVAL_METRICS, path / layout.EVAL_METRICS) if "eval" in parts else ():
        data = _read_json(ev)
        if isinstance(data, dict) and "schema_version" in data and "results" in data:
            run.eval = data
            run.eval_rows = [row for row in read_jsonl(ev.parent / layout.EVAL_EXAMPLES)
                             if row.get("kind") == "task"] if (ev.parent / layout.EVAL_EXAMPLES).is_file() else []
            break
    if "audit" in parts:
        here = [path / layout.AUDIT_DIR] + ([path] if (path / layout.AUDIT_TASKS).is_file() else [])
        for audit in here + linked_audits(path, run.eval):
            if (audit / layout.AUDIT_TASKS).is_file() or (audit / layout.AUDIT_EXAMPLES).is_file():
                run.audit_tasks = _read_json(audit / layout.AUDIT_TASKS)
                run.audit_rows = read_jsonl(audit / layout.AUDIT_EXAMPLES)
                run.audit_dir = audit
                break
    if not (run.summary or run.train_log or run.audit_tasks or run.audit_rows or run.eval):
        raise ValueError(f"{path}: nothing to report (no summary.json, metrics.jsonl, audit/tasks.json or "
                         "eval/metrics.json)")
    return run


# ---- HTML helpers -------------------------------------------------------------------------------------------------
def _num(v, digits: int = 3, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return escape(str(v))
    return f"{100 * v:.1f}" if pct else (f"{v:,}" if isinstance(v, int) else f"{v:.{digits}f}")


def _delta(d: dict | None, pct: bool = False, lower_better: bool = False, neutral: bool = False) -> str:
    """Δ with its 95 % CI, coloured when the CI excludes zero (never when `neutral`: a measure whose direction
    does not say better or worse)."""
    if not d:
        return "–"
    s = 100 if pct else 1
    nd = 1 if pct else 3
    lo, hi = d["ci95"]
    cls = "" if neutral else {"better": " class='good'", "worse": " class='bad'"}.get(_significance(d, lower_better), "")
    return f"<span{cls}>{s * d['delta']:+.{nd}f} [{s * lo:+.{nd}f}, {s * hi:+.{nd}f}]</span>"


def _table(headers: list[str], rows: list[list[str]], num_cols: set[int] = frozenset(),
           text_cols: set[int] = frozenset()) -> str:
    """Cells are already-escaped HTML; headers are escaped here."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            cls = " class='num'" if i in num_cols else (" class='text'" if i in text_cols else "")
            cells.append(f"<td{cls}>{c}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(b64: str | None, alt: str) -> str:
    if not b64:
        return f"<p class='muted'>{escape(alt)}: nothing to plot.</p>"
    return f"<img alt='{escape(alt, quote=True)}' src='data:image/png;base64,{b64}'>"


def _text(s, limit: int = MAX_TEXT) -> str:
    if s is None:
        return "<span class='muted'>–</span>"
    s = str(s)
    return escape(s[:limit] + (" …" if len(s) > limit else ""))


def _na(what: str) -> str:
    return f"<p class='muted'>{escape(what)}</p>"


def _stat(v):
    """A task statistic that may be a number or a quantile dict: its median (else mean)."""
    if isinstance(v, dict):
        return v.get("p50", v.get("mean"))
    return v


# ---- sections -----------------------------------------------------------------------------------------------------
def _significance(d: dict | None, lower_better: bool = False) -> str:
    """How a paired delta reads: better / worse when its 95 % CI excludes 0, else no measurable change."""
    if not d:
        return ""
    lo, hi = d["ci95"]
    if lo <= 0 <= hi:
        return "no measurable change"
    return "better" if (d["delta"] < 0) == lower_better else "worse"


def _learned(model: dict, base: dict, deltas: dict, split: str, label: str) -> str | None:
    """One sentence on a macro split: EM (and accuracy where tasks have label sets) and NLL, base -> tuned."""
    v, b, d = model["macro"].get(split), (base["macro"].get(split) or {}), (deltas.get("macro", {}).get(split) or {})
    if not v:
        return None
    parts = [f"exact match {_num(b.get('exact_match'), pct=True)} % → {_num(v['exact_match'], pct=True)} % "
             f"(Δ {_delta(d.get('exact_match'), pct=True)})"]
    if v.get("accuracy") is not None and b.get("accuracy") is not None:
        majority = (f"; always the commonest answer: {_num(v['majority_baseline'], pct=True)} %"
                    if v.get("majority_baseline") is not None else "")
        parts.append(f"accuracy {_num(b['accuracy'], pct=True)} % → {_num(v['accuracy'], pct=True)} % "
                     f"(Δ {_delta(d.get('accuracy'), pct=True)}{majority})")
    parts.append(f"response NLL {_num(b.get('nll'))} → {_num(v['nll'])} (Δ {_delta(d.get('nll'), lower_better=True)})")
    return f"<li><b>{escape(label)}</b> ({v.get('tasks', '–')} tasks): " + "; ".join(parts) + "</li>"


def _forgot(ev: dict) -> str:
    """One sentence per general probe, from its format-independent measure (never the gold NLL alone)."""
    gen = ev["results"]["model"].get("general", {})
    base = (ev["results"].get("base") or {}).get("general", {})
    dg = (ev.get("deltas") or {}).get("general", {})
    out = []
    for path, v in gen.get("qa", {}).items():
        key = headline_measure(v)
        name = escape(Path(path).name)
        if key is None:
            out.append(f"<li><b>Forgot?</b> {name}: no format-independent measure (no options, no few-shot "
                       "prompt); its gold NLL and zero-shot EM move with answer style alone</li>")
            continue
        d = (dg.get("qa", {}).get(path) or {}).get(key)
        b = base.get("qa", {}).get(path, {}).get(key)
        verdict = {"worse": "forgotten (significantly lower)", "better": "significantly higher",
                   "no measurable change": "nothing measurably forgotten"}.get(_significance(d), "")
        out.append(f"<li><b>Forgot?</b> {name}, {escape(key.replace('_', ' '))}: {_num(b, pct=True)} % → "
                   f"{_num(v[key], pct=True)} % (Δ {_delta(d, pct=True)}): {escape(verdict)}</li>")
    for path, v in gen.get("text", {}).items():
        d = (dg.get("text", {}).get(path) or {}).get("nll")
        verdict = {"worse": "higher: forgotten", "better": "lower",
                   "no measurable change": "no measurable change"}.get(_significance(d, lower_better=True), "")
        out.append(f"<li><b>Forgot?</b> {escape(Path(path).name)}: NLL/token Δ {_delta(d, lower_better=True)} "
                   f"({escape(verdict)})</li>")
    return "".join(out) or ("<li><b>Forgot?</b> <span class='muted'>not measured: evaluate with a general probe "
                            "(sftlab eval --general) to see what tuning cost</span></li>")


def section_headline(runs: list[Run]) -> str:
    """What each run learned (seen tasks), how far it generalised (unseen tasks), what it forgot (general probes,
    read from their format-independent measures), and per task the audit's verdict beside the gain."""
    parts = []
    for r in runs:
        ev = r.eval
        if not ev or not ev["results"].get("base"):
            continue
        model, base, deltas = ev["results"]["model"], ev["results"]["base"], ev.get("deltas") or {}
        lines = [x for x in (_learned(model, base, deltas, "seen", "Learned on seen tasks"),
                             _learned(model, base, deltas, "unseen", "Generalised to unseen tasks")) if x]
        if not lines and model.get("tasks"):
            lines.append(_learned(model, base, deltas, "all", "Task results"))
        lines.append(_forgot(ev))
        verdicts = {t: v.get("verdict") for t, v in ((r.audit_tasks or {}).get("tasks") or {}).items()}
        rows = []
        for t, v in model.get("tasks", {}).items():
            d = deltas.get("tasks", {}).get(t, {})
            verdict = verdicts.get(t)
            cell = f"<span class='verdict-{escape(verdict)}'>{escape(verdict)}</span>" if verdict else "–"
            seen = v.get("seen")
            rows.append([escape(t), "" if seen is None else ("seen" if seen else "unseen"), cell,
                         _num(base["tasks"].get(t, {}).get("exact_match"), pct=True), _num(v["exact_match"], pct=True),
                         _delta(d.get("exact_match"), pct=True), _delta(d.get("nll"), lower_better=True)])
        head = f"<h3>{escape(r.name)}</h3>" if len(runs) > 1 else ""
        table = _table(["task", "", "audit verdict (before training)", "base EM %", "tuned EM %", "Δ EM [95% CI]",
                        "Δ NLL [95% CI]"], rows, num_cols={3, 4, 5, 6}) if rows else ""
        parts.append(head + "<ul>" + "".join(lines) + "</ul>" + table)
    if not parts:
        return _na("No evaluation against a base model found (sftlab eval --base, or sftlab run with eval).")
    return ("<p class='muted'>Δ = tuned − base, paired-bootstrap 95 % CI; green/red only where the CI excludes 0. "
            "Forgetting is read from measures a change of answer style cannot move (choice accuracy, few-shot "
            "exact match). The audit verdict says what the base model already knew of each trained task.</p>"
            + "".join(parts))


def section_overview(runs: list[Run]) -> str:
    rows = []
    for r in runs:
        s = r.summary or {}
        ev = r.eval or {}
        rows.append([escape(r.name), _text(str(r.path)), _num(s.get("steps")), _num(s.get("final_loss")),
                     _num(s.get("eval_loss")), _num(len(s["tasks"])) if isinstance(s.get("tasks"), list) else "–",
                     escape(str(ev.get("model", "–"))), escape(str(ev.get("base") or "–")),
                     "yes" if r.audit_tasks or r.audit_rows else "no"])
    return _table(["run", "path", "steps", "final loss", "eval loss", "training tasks", "evaluated model", "base",
                   "audit"], rows, num_cols={2, 3, 4, 5})


def section_audit(runs: list[Run]) -> str:
    parts = []
    for r in runs:
        if not (r.audit_tasks or r.audit_rows):
            continue
        parts.append(f"<h3>{escape(r.name)}</h3>")
        if r.audit_dir is not None and r.audit_dir.resolve() != (r.path / layout.AUDIT_DIR).resolve() and \
                r.audit_dir.resolve() != r.path.resolve():
            parts.append(f"<p class='muted'>Audit of the training data, found through its selection: "
                         f"{escape(str(r.audit_dir))}</p>")
        tasks = (r.audit_tasks or {}).get("tasks") or {}
        if isinstance(tasks, list):  # tolerate a list of {"task": ...} objects
            tasks = {str(t.get("task")): t for t in tasks if isinstance(t, dict)}
        rows = []
        items = list(tasks.items())
        if isinstance((r.audit_tasks or {}).get("overall"), dict):
            items.append(("overall", r.audit_tasks["overall"]))
        for name, st in items:
            verdict = str(st.get("verdict", "–"))
            rows.append([escape(str(name)), _num(st.get("n")), _num(_stat(st.get("s_cond"))),
                         _num(_stat(st.get("s_uncond"))), _num(_stat(st.get("ifd"))),
                         _num(st.get("share_ifd_gt_1"), pct=True), _num(st.get("exact_match"), pct=True),
                         f"<span class='verdict-{escape(verdict, quote=True)}'>{escape(verdict)}</span>",
                         _text(st.get("reason"), 300)])
        if rows:
            parts.append(_table(["task", "n", "s_cond (median)", "s_uncond (median)", "ifd (median)", "ifd > 1 %",
                                 "exact match %", "verdict", "reason"], rows, num_cols={1, 2, 3, 4, 5, 6}))
        th = (r.audit_tasks or {}).get("thresholds")
        if th:
            parts.append(f"<p class='muted'>thresholds: {_text(json.dumps(th), 500)}</p>")
        parts.append(_img(plots.audit_scatter(r.audit_rows), f"{r.name}: s_cond vs s_uncond by task"))
    return "".join(parts) or _na("No audit found (run `sftlab audit --out RUN/audit`).")


def section_loss(runs: list[Run]) -> str:
    logs = {r.name: r.train_log for r in runs if r.train_log}
    if not logs:
        return _na("No training log (metrics.jsonl) found.")
    return _img(plots.loss_curves(logs), "loss curves")


TASK_METRICS = (("nll", "NLL", False, True), ("exact_match", "EM %", True, False), ("rouge_l", "ROUGE-L %", True, False),
                ("accuracy", "accuracy %", True, False))


def _scaled(v: float | None, scale: float) -> float | None:
    return None if v is None else v * scale


WORST = 3  # examples shown per task


def worst_examples(rows: list[dict], k: int = WORST) -> dict[str, list[dict]]:
    """Per task, the model's `k` worst examples (wrong first, then lowest ROUGE-L, then highest NLL), each with the
    base model's generation for the same record where the eval had a base."""
    base = {r["where"]: r.get("generation") for r in rows if r.get("model") == "base"}
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("model") == "model":
            by_task.setdefault(str(r.get("task")), []).append(r)
    key = lambda r: (r.get("exact_match") or 0.0, r.get("rouge_l") or 0.0, -(r.get("nll") or 0.0))  # noqa: E731
    return {t: [{**r, "base_generation": base.get(r["where"])} for r in sorted(rs, key=key)[:k]]
            for t, rs in by_task.items()}


def _worst_details(anchor: str, task: str, rows: list[dict]) -> str:
    table = _table(["record", "reference", "model", "base", "EM", "ROUGE-L", "NLL"],
                   [[escape(str(r.get("where"))), _text(r.get("reference"), 500), _text(r.get("generation"), 500),
                     _text(r.get("base_generation"), 500), _num(r.get("exact_match"), pct=True),
                     _num(r.get("rouge_l"), pct=True), _num(r.get("nll"))] for r in rows],
                   num_cols={4, 5, 6}, text_cols={1, 2, 3})
    return (f"<details id='{anchor}'><summary>{escape(task)}: the {len(rows)} worst examples "
            f"(examples.jsonl)</summary>{table}</details>")


def section_tasks(runs: list[Run]) -> str:
    parts = []
    for ri, r in enumerate(runs):
        ev = r.eval
        if not ev or not ev["results"]["model"].get("tasks"):
            continue
        model, base = ev["results"]["model"], ev["results"].get("base")
        deltas = (ev.get("deltas") or {}).get("tasks", {})
        parts.append(f"<h3>{escape(r.name)}</h3>")
        for key, label, pct, _ in (TASK_METRICS[0], TASK_METRICS[2]):
            scale = 100 if pct else 1  # the same units as the table (EM / ROUGE-L in %)
            bars = {t: {"model": _scaled(v[key], scale), "base": _scaled(base["tasks"][t][key], scale) if base else None,
                        "seen": v.get("seen")} for t, v in model["tasks"].items()}
            parts.append(_img(plots.task_bars(bars, key, label), f"{r.name}: {label} per task"))
        rows = []
        macro_d = (ev.get("deltas") or {}).get("macro", {})
        entries = [(t, v, base["tasks"][t] if base else None, deltas.get(t, {})) for t, v in model["tasks"].items()]
        entries += [(f"macro ({k})", v, (base or {}).get("macro", {}).get(k) if base else None, macro_d.get(k) or {})
                    for k, v in model["macro"].items() if v]
        worst = worst_examples(r.eval_rows)
        anchors = {t: f"worst-{ri}-{i}" for i, t in enumerate(model["tasks"]) if worst.get(t)}
        for name, v, b, d in entries:
            seen = v.get("seen")
            cell = f"<a href='#{anchors[name]}'>{escape(name)}</a>" if name in anchors else escape(name)
            row = [cell, "" if seen is None else ("seen" if seen else "unseen"), _num(v.get("n"))]
            for key, _, pct, lower in TASK_METRICS:
                row += [_num(b.get(key) if b else None, pct=pct), _num(v.get(key), pct=pct),
                        _delta(d.get(key), pct, lower)]
            majority = _num(v.get("majority_baseline"), pct=True)
            if v.get("degenerate"):
                majority += " ⚠"
            if v.get("degenerate_tasks"):
                majority += f" ({v['degenerate_tasks']} degenerate)"
            rows.append(row + [majority])
        headers = ["task", "seen", "n"]
        for _, label, _, _ in TASK_METRICS:
            headers += [f"{label} base", f"{label} model", f"Δ {label} [95% CI]"]
        headers.append("majority baseline %")
        parts.append(_table(headers, rows, num_cols=set(range(2, len(headers)))))
        parts += [_worst_details(anchors[t], t, worst[t]) for t in model["tasks"] if t in anchors]
        warnings = (ev.get("data") or {}).get("answer_warnings") or []
        if warnings:
            parts.append("<p><b>Accuracy needs its baseline</b> (majority baseline: the exact match / accuracy of "
                         "always giving the task's commonest answer):</p><ul>"
                         + "".join(f"<li>{escape(w)}</li>" for w in warnings) + "</ul>")
        few = ev.get("few_shot")
        if few:
            rows = [[escape(label), _num(few["base_k_shot"]["macro"]["all"][key], pct=pct),
                     _num(few["model_zero_shot"]["macro"]["all"][key], pct=pct),
                     _delta(few["delta"]["macro"]["all"].get(key), pct, lower)] for key, label, pct, lower in TASK_METRICS]
            parts.append(f"<p>Prompting baseline on {len(few['tasks'])} held-out tasks ({_text(', '.join(few['tasks']), 500)}), "
                         f"n = {few['n']}:</p>")
            parts.append(_table(["metric", f"base {few['k']}-shot", "model zero-shot", "Δ [95% CI]"], rows,
                                num_cols={1, 2, 3}))
    return "".join(parts) or _na("No task evaluation found (run `sftlab eval --data ... --out RUN/eval`).")


def section_forgetting(runs: list[Run]) -> str:
    rows = []
    for r in runs:
        ev = r.eval
        if not ev:
            continue
        gen = ev["results"]["model"].get("general", {})
        base = (ev["results"].get("base") or {}).get("general", {})
        dg = (ev.get("deltas") or {}).get("general", {})
        for kind, metrics in (("qa", tuple((m, m in QA_PERCENT, m == "gold_nll") for m in QA_METRICS)),
                              ("text", (("nll", False, True), ("perplexity", False, True)))):
            for path, v in gen.get(kind, {}).items():
                for key, pct, lower in metrics:
                    if v.get(key) is None:  # choice_accuracy of a probe without options
                        continue
                    d = (dg.get(kind, {}).get(path) or {}).get(key)
                    b = base.get(kind, {}).get(path, {}).get(key) if base else None
                    sensitive = kind == "qa" and key in FORMAT_SENSITIVE
                    n = {"choice_accuracy": v.get("n_choice"), "few_shot_exact_match": v.get("n_few_shot"),
                         "few_shot_contains": v.get("n_few_shot")}.get(key, v.get("n", v.get("windows")))
                    rows.append([escape(r.name), escape(Path(path).name),
                                 escape(key + (" (format-sensitive)" if sensitive else "")), _num(b, pct=pct),
                                 _num(v.get(key), pct=pct), _delta(d, pct, lower, neutral=sensitive), _num(n)])
    if not rows:
        return _na("No general-knowledge probe or perplexity found (sftlab eval --general / --text).")
    note = ("<p class='muted'>Δ = model − base with paired-bootstrap 95 % CI; green: significantly better, "
            "red: significantly worse (forgetting). EM/contains/choice accuracy in %. choice_accuracy (the gold "
            "option ranked first among a question's options) and few-shot EM/contains (one fixed prompt that shows "
            "the answer format, the same for both models) cannot be moved by a change of answer style alone; the "
            "gold answer's NLL and zero-shot EM/contains can (a model that learned to answer tersely makes any "
            "short gold answer likelier, gains exact matches and loses long replies that contained the answer), "
            "so their changes are shown but never coloured.</p>")
    return note + _table(["run", "probe", "metric", "base", "model", "Δ [95% CI]", "n"], rows, num_cols={3, 4, 5, 6})


def section_ifeval(runs: list[Run]) -> str:
    """IFEval: the four figures, model vs base with Δ and CI, and instruction-level accuracy per instruction id."""
    rows, parts = [], []
    for r in runs:
        ife = (r.eval or {}).get("ifeval")
        if not ife:
            continue
        base, deltas = ife.get("base"), ife.get("deltas") or {}
        for key in ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose"):
            rows.append([escape(r.name), escape(key.replace("_", "-level, ", 1)), _num(base and base[key], pct=True),
                         _num(ife["model"][key], pct=True), _delta(deltas.get(key), pct=True),
                         _num(ife["model"]["prompts"])])
        by_id = {i: {"model": 100 * v["strict"], "base": 100 * base["by_instruction"][i]["strict"] if base else None,
                     "seen": None} for i, v in ife["model"]["by_instruction"].items()}
        parts.append(_img(plots.task_bars(by_id, "strict", "instructions followed (strict, %)"),
                          f"{r.name}: IFEval per instruction type"))
    if not rows:
        return _na("No IFEval results (sftlab eval --ifeval).")
    note = ("<p class='muted'>Share of prompts whose every instruction is followed (prompt-level) and of all "
            "instructions followed (instruction-level); loose also accepts the reply without its first/last line or "
            "markdown asterisks. Δ = model − base, paired-bootstrap 95 % CI, in points.</p>")
    return note + _table(["run", "figure", "base %", "model %", "Δ [95% CI]", "prompts"], rows,
                         num_cols={2, 3, 4, 5}) + "".join(parts)


# forgetting measures for the trade-off plot, preferred first: the first that every run has is used
FORGETTING_MEASURES = {
    "choice_accuracy": "forgetting: choice accuracy lost on the general probe (points, higher = more forgotten)",
    "few_shot_exact_match": "forgetting: few-shot exact match lost on the general probe (points, higher = more "
                            "forgotten)",
    "text_nll": "forgetting: Δ NLL/token of the first text file (nats, higher = more forgotten)",
    "gold_nll": "forgetting: Δ general-probe gold-answer NLL (nats; format-sensitive: a change of answer style "
                "alone moves it)",
}


def tradeoff_point(run: Run) -> dict | None:
    """Task gain (−Δ macro NLL on seen tasks, else all) and each forgetting measure the run has
    (`FORGETTING_MEASURES`: −Δ choice accuracy and few-shot EM in points, Δ NLL/token of the first text file,
    Δ gold NLL of the first QA probe), with 95 % intervals."""
    d = (run.eval or {}).get("deltas") or {}
    macro = d.get("macro") or {}
    task = (macro.get("seen") or macro.get("all") or {}).get("nll")
    general = d.get("general") or {}
    qa = next(iter(general.get("qa", {}).values()), None) or {}
    text = next(iter(general.get("text", {}).values()), None) or {}
    forgetting = {}
    for key in FORMAT_INDEPENDENT:
        if qa.get(key):
            a = qa[key]
            forgetting[key] = (-100 * a["delta"], [-100 * a["ci95"][1], -100 * a["ci95"][0]])
    if text.get("nll"):
        forgetting["text_nll"] = (text["nll"]["delta"], text["nll"]["ci95"])
    if qa.get("gold_nll"):
        forgetting["gold_nll"] = (qa["gold_nll"]["delta"], qa["gold_nll"]["ci95"])
    if not task or not forgetting:
        return None
    return {"name": run.name, "gain": -task["delta"], "gain_ci": [-task["ci95"][1], -task["ci95"][0]],
            "measures": forgetting}


def pareto_front(points: list[dict]) -> set[str]:
    """Names of the points no other point dominates (at least as much gain and at most as much forgetting,
    better in one): the runs worth choosing between."""
    def dominates(q, p):
        return (q["gain"] >= p["gain"] and q["forgetting"] <= p["forgetting"]
                and (q["gain"] > p["gain"] or q["forgetting"] < p["forgetting"]))
    return {p["name"] for p in points if not any(dominates(q, p) for q in points if q is not p)}


def section_tradeoff(runs: list[Run]) -> str:
    points = [p for p in (tradeoff_point(r) for r in runs) if p]
    measure = next((m for m in FORGETTING_MEASURES if points and all(m in p["measures"] for p in points)), None)
    if len(points) < 2 or measure is None:
        return _na("The trade-off plot needs at least two runs evaluated against their base with task data and a "
                   "general probe or text file in common (found %d)." % len(points))
    for p in points:
        p["forgetting"], p["forgetting_ci"] = p["measures"][measure]
    front = pareto_front(points)
    for p in points:
        p["pareto"] = p["name"] in front
    unit = "points" if measure in QA_PERCENT else "nats"
    rows = [[escape(p["name"]), _num(p["gain"]), f"[{p['gain_ci'][0]:+.3f}, {p['gain_ci'][1]:+.3f}]",
             _num(p["forgetting"]), f"[{p['forgetting_ci'][0]:+.3f}, {p['forgetting_ci'][1]:+.3f}]",
             "yes" if p["pareto"] else ""] for p in points]
    note = (f"{FORGETTING_MEASURES[measure]}. Pareto front (★, joined): no other run has at least as much gain "
            "with at most as much forgetting; point estimates — read the intervals before preferring one.")
    return (f"<p class='muted'>{escape(note)}</p>"
            + _img(plots.tradeoff(points, FORGETTING_MEASURES[measure]), "task gain vs forgetting")
            + _table(["run", "task gain (nats)", "95% CI", f"forgetting ({unit})", "95% CI", "Pareto front"], rows,
                     num_cols={1, 2, 3, 4}))


def section_generations(runs: list[Run], n: int) -> str:
    parts = []
    for r in runs:
        gens = ((r.eval or {}).get("generations") or [])[:n]
        if not gens:
            continue
        has_base = any(g.get("base") is not None for g in gens)
        has_shot = any(g.get("base_k_shot") is not None for g in gens)
        headers = ["task", "prompt", "reference"] + (["base"] if has_base else []) + \
            (["base k-shot"] if has_shot else []) + ["model"]
        rows = []
        for g in gens:
            row = [escape(str(g.get("task"))), _text(g.get("prompt")), _text(g.get("reference"))]
            row += [_text(g.get("base"))] if has_base else []
            row += [_text(g.get("base_k_shot"))] if has_shot else []
            rows.append(row + [_text(g.get("model"))])
        parts.append(f"<h3>{escape(r.name)}</h3>" + _table(headers, rows, text_cols=set(range(1, len(headers)))))
    return "".join(parts) or _na("No generations found (sftlab eval writes them to metrics.json).")


TITLES = {"headline": "At a glance", "overview": "Runs", "audit": "Knowledge audit", "loss": "Loss curves", "tasks": "Per-task results",
          "ifeval": "Instruction following (IFEval)",
          "forgetting": "Forgetting", "tradeoff": "Mitigation trade-off", "generations": "Generations side by side"}


def render_report(runs: list[Run], generations: int = 5, on_section=None) -> str:
    builders = {"headline": lambda: section_headline(runs), "overview": lambda: section_overview(runs), "audit": lambda: section_audit(runs),
                "loss": lambda: section_loss(runs), "tasks": lambda: section_tasks(runs),
                "ifeval": lambda: section_ifeval(runs),
                "forgetting": lambda: section_forgetting(runs), "tradeoff": lambda: section_tradeoff(runs),
                "generations": lambda: section_generations(runs, generations)}
    body = []
    for sid in SECTIONS:
        body.append(f"<section id='{sid}'><h2>{escape(TITLES[sid])}</h2>{builders[sid]()}</section>")
        if on_section:
            on_section(sid)
    nav = "".join(f"<a href='#{sid}'>{escape(TITLES[sid])}</a>" for sid in SECTIONS)
    title = "sftlab report: " + ", ".join(r.name for r in runs)
    created = time.strftime("%Y-%m-%d %H:%M:%S")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{escape(title)}</h1>"
            f"<p class='muted'>generated {created} by sftlab</p><nav>{nav}</nav>{''.join(body)}</body></html>\n")


def write_report(run_dirs: list[str | Path], out: str | Path, console=None, generations: int = 5) -> Path:
    """Read the runs, render the report and write it atomically to `out`."""
    from rich.console import Console

    from ..io import atomic_write

    console = console or Console(stderr=True)
    if not run_dirs:
        raise ValueError("pass at least one run directory")
    runs = [load_run(p) for p in run_dirs]
    names = [r.name for r in runs]
    for r in runs:  # two runs with the same directory name: tell them apart by their parent
        if names.count(r.name) > 1:
            r.name = f"{r.path.parent.name}/{r.path.name}"
    with progress("report", console) as bars:
        bar = bars.add_task("report", total=len(SECTIONS), info="")
        page = render_report(runs, generations, on_section=lambda sid: bars.update(bar, advance=1, info=sid))
    out = Path(out)
    with atomic_write(out) as f:
        f.write(page)
    console.print(f"[green]done[/] report of {len(runs)} run(s), {len(SECTIONS)} sections, "
                  f"{len(page.encode()) / 1024:,.0f} KiB -> {out}", highlight=False)
    return out
