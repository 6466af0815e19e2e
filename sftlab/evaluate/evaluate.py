"""`sftlab eval`: task metrics, general-knowledge probe and perplexity for a model (and its base), with
paired-bootstrap deltas, a few-shot prompting baseline and side-by-side generations.

The recipe: load data once with the evaluated model's tokenizer and chat template -> for each model
(model, then base): NLL forward passes, greedy generations, QA probe, perplexity -> per-task and macro
summaries -> deltas (model minus base) -> `DIR/metrics.json`, `DIR/examples.jsonl`, a terminal summary.
Both models are scored on identical token sequences (the base must share the tokenizer's vocabulary).

Metric definitions: `generalization.py` (task metrics) and `forgetting.py` (QA probe, perplexity).

`DIR/metrics.json` (schema_version 1; every metric is a float or null where it does not apply):

    {
      "schema_version": 1, "settings_sha256": str, "created": ISO time, "wall_s": float,
      "model": str, "base": str | null, "template": str,
      "options": {limit, general_limit, seed, bootstrap, max_new_tokens, qa_max_new_tokens, qa_prompt, qa_shots,
                  few_shot, max_labels, text_window, batch_size, forward_batch_tokens, max_length},
      "training_tasks": [str] | null,        # from the training's OUT/summary.json beside OUT/model, null if unknown
      "data": {"files": [str], "examples": int, "report": DataReport.as_dict(),
               "qa_invalid": {"total": int, "by_reason": {reason: int}, "first": [str]},   # skipped QA records
               "label_sets": {task: [label] | null}, "generation_budgets": {task: int},
               "answer_distributions": {task: data.answers.answer_distribution | null},
               "answer_warnings": [str]},              # single-label or imbalanced tasks
      "results": {                           # "base" only with --base
        "model" | "base": {
          "tasks": {task: {"n", "seen": bool | null, "nll", "exact_match", "rouge_l", "accuracy",
                           "majority_baseline": float | null, "degenerate": bool}},  # EM/acc of the commonest answer
          "macro": {"all": MACRO, "seen": MACRO | null, "unseen": MACRO | null},   # seen/unseen only
                   # when training_tasks is known; MACRO = {"tasks", "n", "nll", "exact_match",
                   # "rouge_l", "accuracy", "majority_baseline"} (means over tasks) + "degenerate_tasks": int
          "general": {"qa": {file: {"n", "choice_accuracy", "few_shot_exact_match", "few_shot_contains",
                                    "gold_nll", "exact_match", "contains": float | null,
                                    "n_choice": int, "n_few_shot": int}},
                      # gold_nll, exact_match, contains (zero-shot) are format-sensitive (forgetting.py)
                      "text": {file: {"windows", "tokens", "nll", "perplexity"}}}}},
      "deltas": null | {                     # model minus base; DELTA = {"delta", "ci95": [lo, hi], "n"}
        "tasks": {task: {metric: DELTA | null}},
        "macro": {"all" | "seen" | "unseen": {metric: DELTA | null} | null},
        "general": {"qa": {file: {qa metric (forgetting.QA_METRICS): DELTA | null}},
                    "text": {file: {"nll": DELTA, "perplexity_ratio": float}}}},
      "few_shot": null | {"k": int, "tasks": [str], "n": int,
                          "base_k_shot": {"tasks", "macro"}, "model_zero_shot": {"tasks", "macro"},
                          "delta": {"tasks", "macro"}},     # model zero-shot minus base k-shot
      "generations": [{"kind": "task" | "qa", "task", "where", "prompt", "reference",
                       "model", "base" | null, "base_k_shot" | null}],
      "ifeval": null | {"model" | "base": ifeval.score.figures, "deltas": ifeval.score.compare}   # --ifeval
    }

Deltas are paired bootstrap 95 % intervals over examples (`metrics.paired_bootstrap_ci`, seeded); macro deltas
resample within each task and average over tasks; the perplexity delta is in mean NLL per token (`perplexity_ratio`
= exp(delta)). For NLL and perplexity lower is better; for the rest higher.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import time
from dataclasses import dataclass
from functools import partial
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import layout
from ..config import DataConfig, EvalConfig
from ..data.answers import answer_warning, degenerate
from ..data.formats import Conversation
from ..data.load import expand_paths
from ..generate import generate
from ..data.pipeline import DataReport, encode_conversations, keep_examples
from ..data.template import resolve_template
from ..data.tokenize import Example
from ..data.validate import InvalidLog
from ..ifeval import responses as ifeval_responses
from ..ifeval import score as ifeval_score
from ..io import progress, table_console
from . import forgetting, generalization
from . import scoring

SCHEMA_VERSION = 1


@dataclass
class Inputs:
    """Everything scored, prepared once with the evaluated model's tokenizer."""

    items: list[generalization.TaskItem]
    qa: dict[str, list[forgetting.QaItem]]
    text: dict[str, list[Example]]
    few: list[tuple[int, Example, Conversation]]  # (item index, k-shot example, k-shot conversation)
    few_tasks: list[str]
    report: DataReport
    qa_invalid: InvalidLog


def _check_same_vocab(tokenizer, base_spec: str) -> None:
    from ..models import load_tokenizer

    if load_tokenizer(base_spec).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"--base {base_spec}: its tokenizer's vocabulary differs from the model's; base and model "
                         "must be scored on the same tokens")


def prepare(cfg: EvalConfig, data_opts: DataConfig, tokenizer, tmpl, training_tasks: list[str] | None,
            with_few_shot: bool, console: Console) -> Inputs:
    from ..data.pipeline import record_progress

    report = DataReport()
    items = []
    if cfg.data:
        with record_progress(cfg.data, console, "read data") as tick:
            items = generalization.load_task_items(cfg.data, tokenizer, data_opts, cfg.limit, report, on_record=tick,
                                                   seed=cfg.seed)
    qa_invalid = InvalidLog()
    qa = {}
    for path in expand_paths(cfg.general) if cfg.general else []:
        qa[str(path)] = forgetting.read_qa([path], tokenizer, tmpl, cfg.question_field, cfg.answer_field,
                                           cfg.qa_prompt, cfg.limit if cfg.general_limit is None else cfg.general_limit,
                                           data_opts.skip_invalid, qa_invalid, data_opts.max_length, cfg.seed,
                                           cfg.choices_field, cfg.qa_distractors, cfg.qa_shots)
    text = {str(p): forgetting.read_text_windows(p, tokenizer, cfg.text_window, cfg.text_field, cfg.limit)
            for p in cfg.text}
    few, few_tasks = [], []
    if cfg.few_shot and with_few_shot and items:
        seen = set(training_tasks or ())
        few_tasks = sorted({it.task for it in items if it.task not in seen})
        idx = [i for i, it in enumerate(items) if it.task in set(few_tasks)]
        convs = generalization.few_shot_conversations([items[i] for i in idx], cfg.few_shot, cfg.seed)
        index_of = {id(c): i for i, c in zip(idx, convs)}
        # a k-shot prompt the length policy drops (or that fails to render) is left out of the comparison
        encoded = encode_conversations(convs, tokenizer, tmpl, data_opts)
        few = [(index_of[id(conv)], ex, conv) for conv, ex in keep_examples(encoded, True, DataReport())]
    return Inputs(items, qa, text, few, few_tasks, report, qa_invalid)


def score_model(model, tokenizer, tmpl, inp: Inputs, cfg: EvalConfig, labels, budgets, label: str,
                console: Console, with_few_shot: bool) -> dict:
    """Per-example rows for one model: task rows, QA rows per file, text NLLs per file, k-shot rows."""
    pad, batch_tokens = tokenizer.pad_token_id, cfg.forward_batch_tokens
    out: dict = {"tasks": [], "qa": {}, "text": {}, "few": []}
    from ..modelcheck import scoring_attention  # imports torch: not at CLI start-up

    attention = scoring_attention(model) if (inp.items or inp.qa or inp.text or inp.few) else None
    example_nll = partial(scoring.example_nll, attention=attention)
    with progress(label, console) as bars:
        def bar(name: str, total: int):
            t = bars.add_task(name, total=total, info=name)
            return lambda n: bars.advance(t, n)

        if inp.items:
            nlls = example_nll(model, [it.example for it in inp.items], pad, batch_tokens,
                               bar("task NLL", len(inp.items)))
            gens = generate(model, tokenizer, [it.prompt for it in inp.items], tmpl,
                            [budgets[it.task] for it in inp.items], batch_size=cfg.batch_size,
                            on_batch=bar("task generation", len(inp.items)))
            out["tasks"] = generalization.score_task_rows(inp.items, nlls, gens, labels)
        for path, items in inp.qa.items():
            name = Path(path).name
            gold = [ex for it in items for ex in it.gold]
            nlls = example_nll(model, gold, pad, batch_tokens, bar(f"{name} gold NLL", len(gold)))
            gens = generate(model, tokenizer, [it.prompt for it in items], tmpl, cfg.qa_max_new_tokens,
                            batch_size=cfg.batch_size, on_batch=bar(f"{name} generation", len(items)))
            shot_items = [it for it in items if it.shot_prompt is not None]
            shot_gens = iter(generate(model, tokenizer, [it.shot_prompt for it in shot_items], tmpl,
                                      cfg.qa_max_new_tokens, batch_size=cfg.batch_size,
                                      on_batch=bar(f"{name} {cfg.qa_shots}-shot generation", len(shot_items)))
                             if shot_items else [])
            shots = [None if it.shot_prompt is None else next(shot_gens) for it in items]
            options = [ex for it in items for ex in it.choices]
            choice = None
            if options:
                choice = forgetting.choice_correct(items, example_nll(model, options, pad, batch_tokens,
                                                                      bar(f"{name} options NLL", len(options))))
            out["qa"][path] = forgetting.qa_rows(items, forgetting.min_gold_nll(items, nlls), gens, choice, shots)
        for path, windows in inp.text.items():
            out["text"][path] = example_nll(model, windows, pad, batch_tokens,
                                            bar(f"{Path(path).name} perplexity", len(windows)))
        if with_few_shot and inp.few:
            items = [inp.items[i] for i, _, _ in inp.few]
            nlls = example_nll(model, [ex for _, ex, _ in inp.few], pad, batch_tokens,
                               bar(f"{cfg.few_shot}-shot NLL", len(inp.few)))
            prompts = [Conversation(c.messages[:-1], c.task, c.where) for _, _, c in inp.few]
            gens = generate(model, tokenizer, prompts, tmpl, [budgets[it.task] for it in items],
                            batch_size=cfg.batch_size, on_batch=bar(f"{cfg.few_shot}-shot generation", len(inp.few)))
            out["few"] = generalization.score_task_rows(items, nlls, gens, labels)
    return out


def summarise_model(rows: dict, training_tasks, answers: dict | None = None) -> dict:
    s = (generalization.summarise_tasks(rows["tasks"], training_tasks, answers) if rows["tasks"]
         else {"tasks": {}, "macro": {}})
    s["general"] = {"qa": {p: forgetting.summarise_qa(r) for p, r in rows["qa"].items()},
                    "text": {p: forgetting.summarise_text(n) for p, n in rows["text"].items()}}
    return s


def general_deltas(base: dict, tuned: dict, n_resamples: int, seed: int) -> dict:
    out = {"qa": {}, "text": {}}
    for path, rows in tuned["qa"].items():
        out["qa"][path] = {}
        for m in forgetting.QA_METRICS:
            pairs = [(b, t) for b, t in zip(forgetting.qa_values(base["qa"][path], m), forgetting.qa_values(rows, m))
                     if b is not None and t is not None]
            out["qa"][path][m] = generalization.delta_entry([b for b, _ in pairs], [t for _, t in pairs], None, None,
                                                            n_resamples, seed) if pairs else None
    for path, nlls in tuned["text"].items():
        b = base["text"][path]
        entry = generalization.delta_entry([n.mean for n in b], [n.mean for n in nlls], None, [n.tokens for n in nlls],
                               n_resamples, seed)
        out["text"][path] = {"nll": entry, "perplexity_ratio": math.exp(entry["delta"])}
    return out


def side_by_side(inp: Inputs, rows: dict[str, dict], n: int) -> list[dict]:
    """Up to n generations, one task at a time in turn (then QA questions), for every model."""
    out = []
    few_gen = {i: r["generation"] for (i, _, _), r in zip(inp.few, rows.get("base", {}).get("few", []))}
    by_task: dict[str, list[int]] = {}
    for i, it in enumerate(inp.items):
        by_task.setdefault(it.task, []).append(i)
    order = [idx[k] for k in range(max(map(len, by_task.values()), default=0)) for idx in by_task.values() if k < len(idx)]
    for i in order[:n]:
        it = inp.items[i]
        prompt = next((m.content for m in reversed(it.prompt.messages) if m.role != "system"), "")
        out.append({"kind": "task", "task": it.task, "where": it.where, "prompt": prompt, "reference": it.reference,
                    "model": rows["model"]["tasks"][i]["generation"],
                    "base": rows["base"]["tasks"][i]["generation"] if "base" in rows else None,
                    "base_k_shot": few_gen.get(i)})
    for path, items in inp.qa.items():
        for k, it in enumerate(items[: max(0, n - len(out))]):
            out.append({"kind": "qa", "task": Path(path).name, "where": it.where, "prompt": it.prompt,
                        "reference": " | ".join(it.answers), "model": rows["model"]["qa"][path][k]["generation"],
                        "base": rows["base"]["qa"][path][k]["generation"] if "base" in rows else None,
                        "base_k_shot": None})
    return out


def scoring_options(data_opts: DataConfig) -> DataConfig:
    """Scores are over exactly the response tokens: prompt tokens never count, whatever the training weight."""
    return data_opts.model_copy(update={"prompt_loss_weight": 0.0})


def evaluate(cfg: EvalConfig, model: str, out: Path, data_opts: DataConfig, base: str | None = None,
             dtype: str = "fp32", console: Console | None = None, resume: bool = True) -> dict:
    """Evaluate `model` (and `base`, scored on the same tokens) on `cfg`'s files read with `data_opts`, write
    `out/metrics.json` and `out/examples.jsonl`, print a summary; returns the metrics. `cfg.base` is the run's
    setting: the caller resolves it into `base`. One process writes `out` at a time; an evaluation already
    complete in `out` with the same settings is not run again (`resume=False` runs it again)."""
    from ..io import output_lock

    console = console or Console(stderr=True)
    settings = json.dumps([cfg.model_dump(mode="json"), str(model), str(base), dtype,
                           data_opts.model_dump(mode="json")], sort_keys=True)
    digest = hashlib.sha256(settings.encode()).hexdigest()
    with output_lock(Path(out)):
        try:
            done = json.loads((Path(out) / layout.EVAL_METRICS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            done = {}
        if resume and done.get("settings_sha256") == digest:
            console.print(f"[green]complete[/] {Path(out) / layout.EVAL_METRICS} already holds this evaluation "
                          "(--no-resume runs it again)", highlight=False, soft_wrap=True)
            return done
        return _evaluate(cfg, model, Path(out), data_opts, base, dtype, console, digest)


def _evaluate(cfg: EvalConfig, model: str, out: Path, data_opts: DataConfig, base: str | None, dtype: str,
              console: Console, digest: str) -> dict:
    from ..io import atomic_write
    from ..models import load_model, load_tokenizer

    if not (cfg.data or cfg.general or cfg.text or cfg.ifeval):
        raise ValueError("nothing to evaluate: pass --data, --general, --text or --ifeval")
    t0 = time.perf_counter()
    data_opts = scoring_options(data_opts)
    tokenizer = load_tokenizer(model)
    tmpl = resolve_template(data_opts.template, tokenizer)
    if base:
        _check_same_vocab(tokenizer, base)
    training_tasks = generalization.training_tasks_of(model)
    inp = prepare(cfg, data_opts, tokenizer, tmpl, training_tasks, base is not None, console)
    prompts = ifeval_score.load_prompts(cfg.ifeval_inputs, cfg.ifeval_limit, cfg.seed) if cfg.ifeval else []
    if not (inp.items or inp.qa or inp.text or prompts):
        raise ValueError("no valid example to evaluate in the given files")
    answers = generalization.task_answer_distributions(inp.items, cfg.max_labels)
    labels = generalization.label_sets(answers)
    budgets = generalization.generation_budgets(inp.items, tokenizer, cfg.max_new_tokens)

    rows: dict[str, dict] = {}
    for role, spec in (("model", model), ("base", base)):
        if spec is None:
            continue
        lm = load_model(spec, dtype=dtype)
        rows[role] = score_model(lm, tokenizer, tmpl, inp, cfg, labels, budgets, role, console,
                                 with_few_shot=role == "base")
        if prompts:
            rows[role]["ifeval"] = ifeval_responses.evaluate_model(lm, tokenizer, tmpl, prompts,
                                                                   cfg.ifeval_max_new_tokens, cfg.batch_size, console)
        del lm
        gc.collect()

    results = {role: summarise_model(r, training_tasks, answers) for role, r in rows.items()}
    deltas = few = None
    if "base" in rows:
        deltas = {"tasks": {}, "macro": {}}
        if inp.items:
            deltas = generalization.task_deltas(rows["base"]["tasks"], rows["model"]["tasks"], training_tasks,
                                                cfg.bootstrap, cfg.seed)
        deltas["general"] = general_deltas(rows["base"], rows["model"], cfg.bootstrap, cfg.seed)
        if inp.few:
            zero = [rows["model"]["tasks"][i] for i, _, _ in inp.few]
            few = {"k": cfg.few_shot, "tasks": inp.few_tasks, "n": len(inp.few),
                   "base_k_shot": generalization.summarise_tasks(rows["base"]["few"], None),
                   "model_zero_shot": generalization.summarise_tasks(zero, None),
                   "delta": generalization.task_deltas(rows["base"]["few"], zero, None, cfg.bootstrap, cfg.seed)}
    metrics = {
        "schema_version": SCHEMA_VERSION, "settings_sha256": digest,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": None, "model": str(model), "base": str(base) if base else None, "template": tmpl.name,
        "options": {"limit": cfg.limit, "general_limit": cfg.general_limit, "seed": cfg.seed,
                    "bootstrap": cfg.bootstrap,
                    "max_new_tokens": cfg.max_new_tokens, "qa_max_new_tokens": cfg.qa_max_new_tokens,
                    "qa_prompt": cfg.qa_prompt, "qa_shots": cfg.qa_shots, "few_shot": cfg.few_shot,
                    "max_labels": cfg.max_labels,
                    "text_window": cfg.text_window, "batch_size": cfg.batch_size,
                    "forward_batch_tokens": cfg.forward_batch_tokens, "max_length": data_opts.max_length},
        "training_tasks": training_tasks,
        "data": {"files": [str(p) for p in cfg.data], "examples": len(inp.items), "report": inp.report.as_dict(),
                 "qa_invalid": {"total": inp.qa_invalid.total, "by_reason": dict(inp.qa_invalid.counts),
                                "first": inp.qa_invalid.examples},
                 "label_sets": labels, "generation_budgets": budgets,
                 "answer_distributions": answers,
                 "answer_warnings": [answer_warning(t, d) for t, d in answers.items() if degenerate(d)]},
        "results": results, "deltas": deltas, "few_shot": few,
        "generations": side_by_side(inp, rows, cfg.generations),
        "ifeval": ifeval_responses.section({role: r["ifeval"] for role, r in rows.items()}, cfg.bootstrap,
                                           cfg.seed) if prompts else None,
    }
    metrics["wall_s"] = time.perf_counter() - t0
    out = Path(out)
    with atomic_write(out / layout.EVAL_EXAMPLES) as f:
        for role, r in rows.items():
            for row in r["tasks"]:
                f.write(json.dumps({"model": role, "kind": "task", **row}, ensure_ascii=False) + "\n")
            for row in r["few"]:
                f.write(json.dumps({"model": role, "kind": f"{cfg.few_shot}-shot", **row}, ensure_ascii=False) + "\n")
            for row in r.get("ifeval", []):
                f.write(json.dumps({"model": role, "kind": "ifeval", **row}, ensure_ascii=False) + "\n")
            for path, qrows in r["qa"].items():
                for row in qrows:
                    f.write(json.dumps({"model": role, "kind": "qa", "file": path, **row}, ensure_ascii=False) + "\n")
    with atomic_write(out / layout.EVAL_METRICS) as f:
        f.write(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    print_summary(metrics, table_console())
    if metrics["ifeval"]:
        lines = ifeval_score.summary_lines(metrics["ifeval"]["model"])
        d = metrics["ifeval"].get("deltas")
        if d:
            lines += [f"vs base: {k} {100 * v['delta']:+.1f} [{100 * v['ci95'][0]:+.1f}, {100 * v['ci95'][1]:+.1f}]"
                      for k, v in d.items() if k in ifeval_score.FIGURES]
        table_console().print("\n".join(lines), highlight=False, markup=False)
    for line in metrics["data"]["answer_warnings"]:
        console.print(f"[bold yellow]warning:[/] {escape(line)}", highlight=False)
    if inp.report.special_text:
        console.print("[bold yellow]warning:[/] data text contains control-token strings, scored as plain text: "
                      + ", ".join(f"{k!r} x{v}" for k, v in inp.report.special_text.items())
                      + " (remove trailing artefacts with --strip)", highlight=False)
    console.print(f"[green]done[/] {metrics_line(metrics)} in {metrics['wall_s']:.0f}s -> {out / layout.EVAL_METRICS}",
                  highlight=False)
    return metrics


# ---- terminal summary ---------------------------------------------------------------------------------------------
def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def _fmt_delta(d: dict | None, pct: bool = False) -> str:
    if not d:
        return ""
    s = 100 if pct else 1
    return f" ({s * d['delta']:+.{1 if pct else 3}f} [{s * d['ci95'][0]:+.{1 if pct else 3}f}, {s * d['ci95'][1]:+.{1 if pct else 3}f}])"


TASK_COLS = (("nll", "NLL", False), ("exact_match", "EM %", True), ("rouge_l", "ROUGE-L %", True),
             ("accuracy", "acc %", True))


def _majority_cell(v: dict) -> str:
    """The majority baseline beside EM/accuracy: flagged for a degenerate task, counted for a macro group."""
    cell = _fmt(v.get("majority_baseline"), True)
    if v.get("degenerate"):
        cell += " (!)"
    if v.get("degenerate_tasks"):
        cell += f" ({v['degenerate_tasks']} degenerate)"
    return cell


def print_summary(m: dict, out: Console) -> None:
    res, deltas = m["results"]["model"], m["deltas"] or {}
    if res["tasks"]:
        t = Table(title="task metrics: model" + (" (Δ vs base [95% CI])" if deltas else ""))
        for name in ("task", "seen", "n") + tuple(c[1] for c in TASK_COLS) + ("majority %",):
            t.add_column(name, justify="left" if name == "task" else "right")
        rows = [(k, v, deltas.get("tasks", {}).get(k, {})) for k, v in res["tasks"].items()]
        rows += [(f"macro ({k})", v, deltas.get("macro", {}).get(k) or {}) for k, v in res["macro"].items() if v]
        for name, v, d in rows:
            seen = v.get("seen")
            t.add_row(name, "" if seen is None else ("seen" if seen else "unseen"), str(v["n"]),
                      *[_fmt(v[key], pct) + _fmt_delta(d.get(key), pct) for key, _, pct in TASK_COLS],
                      _majority_cell(v))
        out.print(t)
    gen = res["general"]
    if gen["qa"] or gen["text"]:
        t = Table(title="general knowledge / perplexity")
        for name in ("file", "metric", "base", "model", "Δ [95% CI]"):
            t.add_column(name, justify="left" if name in ("file", "metric") else "right")
        base = m["results"].get("base", {}).get("general", {})
        for kind, metric_names in (("qa", forgetting.QA_METRICS), ("text", ("nll", "perplexity"))):
            for path, v in gen[kind].items():
                for metric in metric_names:
                    if v.get(metric) is None:  # choice_accuracy of a probe without options
                        continue
                    pct = kind == "qa" and metric in forgetting.QA_PERCENT
                    b = base.get(kind, {}).get(path, {}).get(metric) if base else None
                    d = (deltas.get("general", {}).get(kind, {}).get(path, {}) or {}).get(metric)
                    label = metric + (" (format-sensitive)" if kind == "qa" and metric in forgetting.FORMAT_SENSITIVE
                                      else "")
                    t.add_row(Path(path).name, label, _fmt(b, pct), _fmt(v[metric], pct),
                              _fmt_delta(d, pct).strip(" ()"))
        out.print(t)
    if m["few_shot"]:
        f = m["few_shot"]
        t = Table(title=f"prompting baseline on {len(f['tasks'])} held-out tasks: base {f['k']}-shot vs model zero-shot")
        for name in ("metric", f"base {f['k']}-shot", "model 0-shot", "Δ [95% CI]"):
            t.add_column(name, justify="right")
        for key, label, pct in TASK_COLS:
            t.add_row(label, _fmt(f["base_k_shot"]["macro"]["all"][key], pct),
                      _fmt(f["model_zero_shot"]["macro"]["all"][key], pct),
                      _fmt_delta(f["delta"]["macro"]["all"].get(key), pct).strip(" ()"))
        out.print(t)


def metrics_line(m: dict) -> str:
    """The key numbers of a metrics.json in one line (the `done` line of `sftlab eval`)."""
    res = m["results"]["model"]
    parts = []
    if res["tasks"]:
        a = res["macro"]["all"]
        parts.append(f"{m['data']['examples']:,} examples in {len(res['tasks'])} tasks: macro NLL {a['nll']:.3f}, "
                     f"EM {100 * a['exact_match']:.1f}%, ROUGE-L {100 * a['rouge_l']:.1f}%")
        d = (m["deltas"] or {}).get("macro", {}).get("all")
        if d:
            parts.append(f"Δ NLL vs base {d['nll']['delta']:+.3f} [{d['nll']['ci95'][0]:+.3f}, {d['nll']['ci95'][1]:+.3f}]")
    for path, v in res["general"]["qa"].items():
        choice = (f"choice accuracy {100 * v['choice_accuracy']:.1f}% (n={v['n_choice']}), "
                  if v.get("choice_accuracy") is not None else "")
        shots = (f"{m['options'].get('qa_shots')}-shot EM {100 * v['few_shot_exact_match']:.1f}%, "
                 if v.get("few_shot_exact_match") is not None else "")
        parts.append(f"{Path(path).parent.name}/{Path(path).name}: {choice}{shots}format-sensitive: gold NLL "
                     f"{v['gold_nll']:.3f}, EM {100 * v['exact_match']:.1f}%, contains {100 * v['contains']:.1f}% "
                     f"(n={v['n']})")
    for path, v in res["general"]["text"].items():
        parts.append(f"{Path(path).name}: perplexity {v['perplexity']:.2f}")
    if m.get("ifeval"):
        f = m["ifeval"]["model"]
        parts.append(f"IFEval ({f['prompts']} prompts) prompt strict {100 * f['prompt_strict']:.1f}%, instruction "
                     f"loose {100 * f['instruction_loose']:.1f}%")
    return "; ".join(parts)


def key_numbers(m: dict) -> dict:
    """What a run logs of a metrics.json: macro EM/NLL (all, seen, unseen) and, per QA probe, its
    format-independent measure and zero-shot EM, model and base."""
    model, base = m["results"]["model"], m["results"].get("base")
    out: dict = {"examples": m["data"]["examples"], "macro": {}, "qa": {}}
    for k, v in (model.get("macro") or {}).items():
        if v:
            b = (base or {}).get("macro", {}).get(k) or {}
            out["macro"][k] = {"tasks": v.get("tasks"), "exact_match": v["exact_match"], "nll": v["nll"],
                               "base_exact_match": b.get("exact_match"), "base_nll": b.get("nll")}
    for path, v in model["general"]["qa"].items():
        b = (base or {}).get("general", {}).get("qa", {}).get(path) or {}
        # the probe's format-independent figure: choice accuracy, else few-shot exact match (forgetting.py)
        measure = forgetting.headline_measure(v) or "exact_match"
        out["qa"][Path(path).name] = {"n": v["n"], "measure": measure, "value": v[measure],
                                      "base_value": b.get(measure), "exact_match": v["exact_match"],
                                      "base_exact_match": b.get("exact_match")}
    return out
