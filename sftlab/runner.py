"""`sftlab run CONFIG.yaml`: audit -> select -> train -> eval -> report in one command and one run directory.

The stages are the library functions behind the single commands (`run_audit`, `run_select`, `train`,
`evaluate`, the HTML report), configured by the sections of one `RunConfig` (`audit`, `select`, `train`,
`eval`, `report`). The run directory RUN (= `output_dir`) holds every stage's directory, laid out in
`sftlab.layout` (RUN/audit, RUN/select/train.jsonl, RUN/train, RUN/eval, RUN/report.html), and:

    RUN/config.yaml        the run's config, every key (defaults filled in)
    RUN/run.json           the stage log: {"stages": {stage: {status, settings, needs, id, started, finished,
                           wall_s, result}}}; status is "running" from a stage's start, "complete" only after
                           every output of the stage has been written

The selected training set replaces data.train for training; eval compares the tuned model with its base
(eval.base, else model.path).

Re-running resumes. For every stage, in order, the log decides:
- complete, same settings, its input stages unchanged (same completion ids), outputs present: skipped;
- "running" (interrupted) with the same settings: run again; the audit continues from its partial files
  and training from its last checkpoint, the other stages start over (their outputs are written atomically
  by the commands, so a killed stage never leaves a file that looks finished);
- settings changed, or an input stage is run again: redone after discarding its outputs. For the costly
  stages (audit, train) this is an error unless asked for (`--from STAGE`, or `on_change="redo"` /
  `--redo-changed`), so editing a config never silently throws away a training run.
`--from STAGE` redoes STAGE and every later stage; `--only STAGE` redoes just STAGE (its inputs must be
complete; later stages then see a changed input and are redone by the next plain run).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml
from rich.console import Console
from rich.markup import escape

from . import layout
from .config import RunConfig, dump_config
from .io import atomic_write, output_lock

STAGES = ("audit", "select", "train", "eval", "report")
COSTLY = ("audit", "train")  # a settings change is an error unless asked for: redoing them discards work
DATA_KEYS = ("format", "template", "task_map", "task_field", "strip", "max_length", "truncation", "loss_on",
             "skip_invalid", "dedup")
SELECT_FILE = f"<RUN>/{layout.SELECT_DIR}/{layout.SELECTED}"  # how the selected file appears in train's settings


@dataclass
class Stage:
    name: str
    settings: dict  # everything the stage's output depends on, apart from its input stages
    needs: tuple[str, ...]  # input stages
    outputs: tuple[Path, ...]  # present when complete
    work: tuple[Path, ...]  # removed when the stage is redone
    run: Callable[[], dict]  # does the work; returns the key numbers for the log and the summary line


# ---- paths and derived configs ------------------------------------------------------------------------------------
def select_file(run_dir: Path) -> Path:
    return run_dir / layout.SELECT_DIR / layout.SELECTED


def trained_model_dir(cfg: RunConfig, run_dir: Path) -> Path:
    return layout.trained_model(run_dir / layout.TRAIN_DIR, cfg.lora.enabled)


def train_config(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """The config the train stage trains with: output_dir RUN/train, and the selected file as data if any."""
    data = cfg.data
    if cfg.select.strategy:  # the selection is messages records with the (already stripped) task labels
        data = data.model_copy(update={"train": [str(select_file(run_dir))], "format": "messages",
                                       "task_field": "task", "task_map": None, "strip": []})
    return cfg.model_copy(update={"output_dir": str(run_dir / layout.TRAIN_DIR), "data": data})


def _train_settings(tcfg: RunConfig, run_dir: Path) -> dict:
    s = tcfg.model_dump(mode="json", include={"model", "lora", "data", "train"})
    sel = str(select_file(run_dir))
    s["data"]["train"] = [SELECT_FILE if p == sel else p for p in s["data"]["train"]]
    return s


def _data_settings(cfg: RunConfig) -> dict:
    return cfg.data.model_dump(mode="json", include=set(DATA_KEYS))


def eval_enabled(cfg: RunConfig) -> bool:
    return bool(cfg.eval.data or cfg.eval.general or cfg.eval.text or cfg.eval.ifeval)


# ---- the stages -----------------------------------------------------------------------------------------------------
def _run_audit(cfg: RunConfig, run_dir: Path, console: Console) -> dict:
    from .audit.command import run_audit
    from .audit.verdicts import VERDICTS

    summary = run_audit(list(cfg.data.train), run_dir / "audit", cfg.audit, cfg.data, cfg.model.path,
                        console=console)
    counts = Counter(s["verdict"] for s in summary["tasks"].values())
    return {"examples": summary["overall"]["n"], "tasks": len(summary["tasks"]),
            "verdicts": {v: counts[v] for v in VERDICTS}}


def _run_select(cfg: RunConfig, run_dir: Path, console: Console) -> dict:
    from .select import run_select

    s = cfg.select
    summary = run_select(run_dir / layout.AUDIT_DIR, select_file(run_dir), s.strategy, s.budget, console,
                         seed=s.seed, dup_threshold=s.dup_threshold, rehearsal_rouge=s.rehearsal_rouge)
    return {"strategy": s.strategy, "budget": summary["budget"], "kept": summary["kept"],
            "available": summary["available"],
            **{k: summary[k] for k in ("rehearsed", "gold") if k in summary}}


def _run_train(cfg: RunConfig, run_dir: Path, console: Console) -> dict:
    from .train.loop import train

    res = train(train_config(cfg, run_dir), console, resume=True)
    return {"steps": res.steps, "final_loss": res.final_loss, "initial_eval_loss": res.initial_eval_loss,
            "eval_loss": res.eval_loss, "train_examples": res.train_examples,
            "model_dir": str(trained_model_dir(cfg, run_dir))}


def _run_eval(cfg: RunConfig, run_dir: Path, console: Console) -> dict:
    from .evaluate.evaluate import evaluate, key_numbers

    metrics = evaluate(cfg.eval, str(trained_model_dir(cfg, run_dir)), run_dir / layout.EVAL_DIR, cfg.data,
                       base=cfg.eval.base or cfg.model.path, dtype=cfg.model.dtype, console=console)
    return key_numbers(metrics)


def _run_report(cfg: RunConfig, run_dir: Path, console: Console, parts: tuple[str, ...]) -> dict:
    """The HTML report of this run: the parts (stages) of this run's plan, read from their stage dirs."""
    from .report.html import load_run, render_report

    run = load_run(run_dir, parts)
    run.name = run_dir.resolve().name
    page = render_report([run], cfg.eval.generations)
    out = run_dir / layout.REPORT_FILE
    with atomic_write(out) as f:
        f.write(page)
    console.print(f"[green]done[/] report, {len(page.encode()) / 1024:,.0f} KiB -> {escape(str(out))}",
                  highlight=False)
    return {"path": str(out)}


def plan(cfg: RunConfig, console: Console | None = None) -> list[Stage]:
    """The enabled stages of `cfg`, in order (nothing is run or written)."""
    console = console or Console(stderr=True)
    run_dir = Path(cfg.output_dir)
    if not cfg.data.train:
        raise ValueError("data.train is empty: give training data files (data.train=[path, ...])")
    if cfg.select.strategy and not cfg.audit.enabled:
        raise ValueError(f"select.strategy={cfg.select.strategy} chooses from the audit: set audit.enabled=true "
                         "(or remove select.strategy)")
    if cfg.select.strategy == "self-rehearsal" and not cfg.audit.generate:
        raise ValueError("select.strategy=self-rehearsal trains on the base model's own answers: set "
                         "audit.generate=true so the audit records them")
    stages = []
    if cfg.audit.enabled:
        d = run_dir / layout.AUDIT_DIR
        stages.append(Stage(
            "audit", {"data": list(cfg.data.train), **_data_settings(cfg), "model": cfg.model.path,
                      **cfg.audit.model_dump(mode="json", exclude={"enabled"})},
            (), layout.audit_outputs(d), (d,),
            lambda: _run_audit(cfg, run_dir, console)))
    if cfg.select.strategy:
        f = select_file(run_dir)
        stages.append(Stage("select", cfg.select.model_dump(mode="json"), ("audit",),
                            (f, layout.selection_summary(f)), (f.parent,),
                            lambda: _run_select(cfg, run_dir, console)))
    tcfg, t = train_config(cfg, run_dir), run_dir / layout.TRAIN_DIR
    stages.append(Stage("train", _train_settings(tcfg, run_dir), ("select",) if cfg.select.strategy else (),
                        (t / layout.TRAIN_SUMMARY, trained_model_dir(cfg, run_dir)), (t,),
                        lambda: _run_train(cfg, run_dir, console)))
    if eval_enabled(cfg):
        stages.append(Stage("eval", {**cfg.eval.model_dump(mode="json"), "base": cfg.eval.base or cfg.model.path,
                                     "dtype": cfg.model.dtype, "data_options": _data_settings(cfg)},
                            ("train",), (run_dir / layout.EVAL_DIR / layout.EVAL_METRICS,), (run_dir / layout.EVAL_DIR,),
                            lambda: _run_eval(cfg, run_dir, console)))
    if cfg.report:
        parts = tuple(s.name for s in stages if s.name in ("audit", "train", "eval"))
        page = run_dir / layout.REPORT_FILE
        stages.append(Stage("report", {"generations": cfg.eval.generations}, parts, (page,), (page,),
                            lambda: _run_report(cfg, run_dir, console, parts)))
    return stages


# ---- the stage log ------------------------------------------------------------------------------------------------
def read_log(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    if not path.is_file():
        return {"stages": {}}
    try:
        log = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); delete it to start the run over") from None
    if not isinstance(log, dict) or not isinstance(log.get("stages"), dict):
        raise ValueError(f"{path}: not a sftlab run log (no 'stages'); delete it to start the run over")
    return log


def write_log(run_dir: Path, log: dict) -> None:
    with atomic_write(run_dir / "run.json") as f:
        json.dump(log, f, indent=2)


def _flatten(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def changed_keys(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))


def _leftover_train_config(stage: Stage, run_dir: Path) -> list[str]:
    """Keys in which a training dir left without a log entry (an older run, a deleted run.json) differs."""
    path = run_dir / layout.TRAIN_DIR / layout.TRAIN_CONFIG
    if not path.is_file():
        return []
    try:
        old = RunConfig.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except Exception:  # unreadable or from another version: its checkpoints cannot be trusted to match
        return [f"{path} (unreadable)"]
    return changed_keys(_train_settings(old, run_dir), stage.settings)


def decide(stages: list[Stage], log: dict, run_dir: Path, forced: set[str]) -> dict[str, tuple[str, str]]:
    """stage -> (action, reason); action: skip | resume (run, keeping partial work) | redo (discard, run)."""
    out: dict[str, tuple[str, str]] = {}
    for st in stages:
        entry = log["stages"].get(st.name)
        rerun = [n for n in st.needs if out.get(n, ("skip",))[0] != "skip"]
        if st.name in forced:
            out[st.name] = ("redo", "asked for")
        elif entry is None:
            diff = _leftover_train_config(st, run_dir) if st.name == "train" else []
            out[st.name] = ("redo", "settings changed: " + ", ".join(diff)) if diff else ("resume", "")
        elif entry.get("settings") != st.settings:
            out[st.name] = ("redo", "settings changed: " + ", ".join(changed_keys(entry.get("settings") or {},
                                                                                   st.settings)))
        elif rerun:
            out[st.name] = ("redo", f"its input ({', '.join(rerun)}) is run again")
        elif entry.get("needs") != {n: log["stages"][n].get("id") for n in st.needs}:
            out[st.name] = ("redo", "its input stage was redone since")
        elif entry.get("status") != "complete":
            out[st.name] = ("resume", "interrupted before; continuing")
        elif missing := [str(p) for p in st.outputs if not p.exists()]:
            out[st.name] = ("resume", "missing " + ", ".join(missing))
        else:
            out[st.name] = ("skip", "complete")
    return out


# ---- the pipeline -------------------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_pipeline(cfg: RunConfig, console: Console | None = None, from_stage: str | None = None,
                 only: str | None = None, on_change: str = "error", summary: bool = True) -> dict:
    """Run (or resume) every enabled stage of `cfg` in `cfg.output_dir`; returns the stage log (RUN/run.json).

    on_change: "error" stops before anything runs when a costly stage (audit, train) would have to be redone
    because its settings or inputs changed; "redo" redoes it.
    """
    from .train.lifecycle import TrainingInterrupted

    console = console or Console(stderr=True)
    if on_change not in ("error", "redo"):
        raise ValueError(f"on_change must be 'error' or 'redo', got {on_change!r}")
    if from_stage and only:
        raise ValueError("pass either --from or --only, not both")
    run_dir = Path(cfg.output_dir)
    stages = plan(cfg, console)
    names = [s.name for s in stages]
    for opt, name in (("--from", from_stage), ("--only", only)):
        if name is not None and name not in names:
            why = "is not a stage" if name not in STAGES else "is off in this config"
            raise ValueError(f"{opt} {name}: {why} (stages here: {', '.join(names)})")
    forced = set(names[names.index(from_stage):]) if from_stage else {only} if only else set()
    log = read_log(run_dir)
    actions = decide(stages, log, run_dir, forced)
    if only:
        missing = [n for n in stages[names.index(only)].needs if actions[n][0] != "skip"]
        if missing:
            raise ValueError(f"--only {only}: its input stage {', '.join(missing)} is not complete; run without "
                             "--only first")
        stages = [s for s in stages if s.name == only]
    blocked = [(s.name, actions[s.name][1]) for s in stages
               if s.name in COSTLY and s.name not in forced and actions[s.name][0] == "redo"
               and (s.name in log["stages"] or any(p.exists() for p in s.work))]
    if blocked and on_change == "error":
        name, why = blocked[0]
        raise ValueError(f"{run_dir}: the {name} stage was made with other settings or inputs ({why}); "
                         f"pass --from {name} to redo it and every later stage (discarding {run_dir / name}), "
                         "--redo-changed to redo whatever changed, or use another output_dir")

    run_dir.mkdir(parents=True, exist_ok=True)
    with output_lock(run_dir):  # one `sftlab run` per run directory
        with atomic_write(run_dir / "config.yaml") as f:
            f.write(dump_config(cfg))
        t0 = time.perf_counter()
        for i, st in enumerate(stages, start=1):
            action, why = actions[st.name]
            console.rule(f"[bold]{i}/{len(stages)} {st.name}[/]" + (f" [dim]({escape(why)})[/]" if why else ""))
            if action == "skip":
                done = escape(stage_summary(st.name, log["stages"][st.name]["result"]))
                console.print(f"[dim]complete, skipped: {done}[/]", highlight=False)
                continue
            if action == "redo":
                for p in st.work:
                    if p.is_dir():
                        shutil.rmtree(p)
                    else:
                        p.unlink(missing_ok=True)
            entry = {"status": "running", "settings": st.settings,
                     "needs": {n: log["stages"][n]["id"] for n in st.needs}, "started": _now()}
            log["stages"][st.name] = entry
            write_log(run_dir, log)
            t = time.perf_counter()
            try:
                result = st.run()
            except TrainingInterrupted as e:  # the stage log says where it stopped; re-running resumes
                entry.update(status="interrupted", signal=e.signal_name, step=e.step, finished=_now())
                write_log(run_dir, log)
                raise
            entry.update(status="complete", id=uuid.uuid4().hex[:12], finished=_now(),
                         wall_s=round(time.perf_counter() - t, 3), result=result)
            write_log(run_dir, log)
        if summary:
            console.rule()
            console.print(f"[green]done[/] {escape(run_summary_line(log, [s.name for s in stages]))} "
                          f"(this call {(time.perf_counter() - t0) / 60:.1f} min) -> {escape(str(run_dir))}",
                          highlight=False, soft_wrap=True)
        return log


    # ---- summaries ------------------------------------------------------------------------------------------------------
def _pct(v) -> str:
    return "-" if v is None else f"{v:.0%}"


def stage_summary(name: str, r: dict) -> str:
    if name == "audit":
        v = r["verdicts"]
        return (f"audited {r['examples']:,} examples, {r['tasks']} tasks: {v.get('known', 0)} known, "
                f"{v.get('latent', 0)} latent, {v.get('unknown', 0)} unknown")
    if name == "select":
        own = f", {r['rehearsed']:,} on the base model's own answer" if "rehearsed" in r else ""
        return f"selected {r['kept']:,} of {r['available']:,} ({r['strategy']}{own})"
    if name == "train":
        s = f"trained {r['steps']} steps"
        if r.get("final_loss") is not None:
            s += f", loss {r['final_loss']:.3f}"
        if r.get("eval_loss") is not None:
            s += ", eval loss " + (f"{r['initial_eval_loss']:.3f} -> " if r.get("initial_eval_loss") is not None
                                   else "") + f"{r['eval_loss']:.3f}"
        return s + f" ({r['model_dir']})"
    if name == "eval":
        parts = []
        for k, v in r["macro"].items():
            if k == "all" and len(r["macro"]) > 1:
                continue
            parts.append(f"{k} tasks EM {_pct(v['base_exact_match'])} -> {_pct(v['exact_match'])}")
        parts += [f"{f} {v.get('measure', 'exact_match').replace('_', ' ')} {_pct(v.get('base_value', v['base_exact_match']))} -> "
                  f"{_pct(v.get('value', v['exact_match']))}" for f, v in r["qa"].items()]
        return "eval (base -> tuned): " + (", ".join(parts) or "done")
    if name == "report":
        return f"report {r['path']}"
    return name


def run_summary_line(log: dict, names: list[str] | None = None) -> str:
    """One line with the key numbers of every complete stage (of `names`, default all)."""
    parts = []
    for name in names or STAGES:
        e = log["stages"].get(name)
        if e and e.get("status") == "complete":
            parts.append(stage_summary(name, e["result"]))
    return "; ".join(parts)


__all__ = ["STAGES", "Stage", "plan", "decide", "run_pipeline", "read_log", "run_summary_line", "stage_summary",
           "train_config", "trained_model_dir"]
