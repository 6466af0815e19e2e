"""sftlab command line: parses arguments and calls library functions (every command has a Python API)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .config import AuditConfig, DataConfig, EvalConfig, ModelConfig

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Supervised instruction fine-tuning: audit what the model knows, train, evaluate, report.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect, tokenize and split instruction data.")
app.add_typer(data_app, name="data")
console = Console(stderr=True)

# ---- shared options (the same names as the config keys) -------------------------------------------------
HelpConfigOpt = Annotated[bool, typer.Option("--help-config", help="List every config key with default and description")]
ModelOpt = Annotated[str, typer.Option("--model", help="HF model dir, a .gguf file, or 'default' (SmolLM2-135M-Instruct)")]
D = DataConfig()  # the data options' defaults: every data flag's default is the config's own


def _decls(name: str, decls: tuple[str, ...]) -> tuple[str, ...]:
    return decls or (f"--{name.replace('_', '-')}",)


def flag(section, name: str, *decls: str, **kwargs):
    """A typer option whose default and help are the config field's own: one definition per option, shared by
    YAML, `key=value` overrides, CLI flags and the Python API (`--max-new-tokens` for `max_new_tokens`)."""
    field = section.model_fields[name]
    default = field.default_factory() if field.default_factory else field.default
    return typer.Option(default, *_decls(name, decls), help=field.description, **kwargs)


def described(section, name: str, *decls: str, **kwargs):
    """The same for an `Annotated` option (its default goes in the signature: `= D.name`)."""
    return typer.Option(*_decls(name, decls), help=section.model_fields[name].description, **kwargs)


FormatOpt = Annotated[Optional[str], described(DataConfig, "format")]
TemplateOpt = Annotated[str, described(DataConfig, "template")]
MaxLenOpt = Annotated[Optional[int], described(DataConfig, "max_length")]
TruncOpt = Annotated[str, described(DataConfig, "truncation")]
LossOnOpt = Annotated[str, described(DataConfig, "loss_on")]
PromptWOpt = Annotated[float, described(DataConfig, "prompt_loss_weight")]
StripOpt = Annotated[Optional[list[str]], described(DataConfig, "strip")]
TaskMapOpt = Annotated[Optional[str], described(DataConfig, "task_map")]
TaskFieldOpt = Annotated[Optional[str], described(DataConfig, "task_field")]
SkipOpt = Annotated[bool, described(DataConfig, "skip_invalid")]
DedupOpt = Annotated[bool, described(DataConfig, "dedup")]


def data_config(**flags) -> DataConfig:
    """The data options of a command's flags (flags it does not take keep the config's defaults), validated by
    the config; a bad value is an error naming its flag."""
    from pydantic import ValidationError

    flags["strip"] = list(flags.get("strip") or [])
    try:
        return DataConfig(**flags)
    except ValidationError as e:
        raise ValueError("; ".join(f"--{'.'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}"
                                   if err["loc"] else err["msg"].removeprefix("Value error, ")
                                   for err in e.errors())) from None


def fail(message: str, code: int = 1):
    # soft_wrap: one unbroken line, so `FILE:LINE: reason` stays greppable however narrow the terminal
    console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def run_guarded(fn):
    """Turn expected user errors into one clear line and a non-zero exit."""
    from .data.template import TemplateError
    from .data.validate import DataError
    from .models import ModelError

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # sftlab shows its own progress; HF's per-load bars are noise here
    try:
        return fn()
    except (DataError, TemplateError, ModelError, FileNotFoundError, ValueError) as e:
        fail(str(e).replace("[", "\\["))


EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal after a checkpoint; running the same command resumes


def run_training(fn):
    """`run_guarded`, plus a diverged training (non-finite loss), a checkpoint that could not be written and a busy
    output directory reported as one clear line; a stop signal ends with a checkpoint, a resume hint and exit code
    75."""
    import shlex

    from .io import DirectoryBusy
    from .train.checkpoint import CheckpointError
    from .train.loop import TrainingDiverged, TrainingInterrupted

    def go():
        try:
            return fn()
        except (TrainingDiverged, CheckpointError, DirectoryBusy) as e:
            fail(str(e))
        except TrainingInterrupted as e:
            from rich.markup import escape

            command = shlex.join(["sftlab", *sys.argv[1:]])
            console.print(f"[yellow]interrupted[/] by {e.signal_name} at step {e.step}: checkpoint "
                          f"{escape(str(e.checkpoint))}; resume with: {escape(command)}", highlight=False,
                          soft_wrap=True)
            raise typer.Exit(EXIT_INTERRUPTED)

    return run_guarded(go)


# ---- data -------------------------------------------------------------------------------------------------
@data_app.command("tokenize")
def data_tokenize(
    data: Annotated[list[str], typer.Argument(help="Files, directories, globs or saved datasets")],
    out: Annotated[Path, typer.Option("--out", help="Output JSONL: {task, input_ids, labels} per example")],
    model: ModelOpt = "default", fmt: FormatOpt = D.format, template: TemplateOpt = D.template,
    max_length: MaxLenOpt = D.max_length, truncation: TruncOpt = D.truncation, loss_on: LossOnOpt = D.loss_on,
    prompt_loss_weight: PromptWOpt = D.prompt_loss_weight, strip: StripOpt = None, task_map: TaskMapOpt = D.task_map,
    task_field: TaskFieldOpt = D.task_field, skip_invalid: SkipOpt = D.skip_invalid, dedup: DedupOpt = D.dedup,
):
    """Write exactly the (unpacked) tensors training will see, one line per example in input order."""
    from .data.stats import tokenize_to_file

    def go():
        opts = data_config(format=fmt, template=template, max_length=max_length, truncation=truncation,
                           loss_on=loss_on, prompt_loss_weight=prompt_loss_weight, strip=strip, task_map=task_map,
                           task_field=task_field, skip_invalid=skip_invalid, dedup=dedup)
        return tokenize_to_file(data, model, opts, out, console)

    run_guarded(go)


@data_app.command("inspect")
def data_inspect(
    data: Annotated[list[str], typer.Argument(help="Files, directories, globs or saved datasets")],
    model: ModelOpt = "default", fmt: FormatOpt = D.format, template: TemplateOpt = D.template,
    max_length: MaxLenOpt = D.max_length, truncation: TruncOpt = D.truncation, loss_on: LossOnOpt = D.loss_on,
    prompt_loss_weight: PromptWOpt = D.prompt_loss_weight, strip: StripOpt = None, task_map: TaskMapOpt = D.task_map,
    task_field: TaskFieldOpt = D.task_field, dedup: DedupOpt = D.dedup,
    as_json: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON on stdout")] = False,
):
    """Counts per format and task, token lengths, trained fraction, invalid records, special-token warnings."""
    from .data.stats import inspect_data

    def go():
        # inspect reports invalid records instead of stopping at the first one
        opts = data_config(format=fmt, template=template, max_length=max_length, truncation=truncation,
                           loss_on=loss_on, prompt_loss_weight=prompt_loss_weight, strip=strip, task_map=task_map,
                           task_field=task_field, skip_invalid=True, dedup=dedup)
        return inspect_data(data, model, opts, console, as_json=as_json)

    run_guarded(go)


def _config_or_help(config: Optional[Path], overrides: Optional[list[str]], help_config: bool):
    """The validated RunConfig of `CONFIG [key=value ...]` (the file may be left out), or None after --help-config."""
    from .config import ConfigError, config_help, load_config

    if help_config:
        for key, default, desc in config_help():
            print(f"{key:32s} {default:24s} {desc}")
        return None
    if config is not None and "=" in str(config) and not config.exists():
        overrides, config = [str(config)] + list(overrides or []), None
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        fail(str(e).replace("[", "\\["))


# ---- train / merge -----------------------------------------------------------------------------------------
@app.command("train")
def train_cmd(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config (see configs/)")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="dotted key=value overrides, e.g. train.lr=1e-5")] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from the last checkpoint in output_dir")] = True,
    help_config: HelpConfigOpt = False,
):
    """Fine-tune (full or LoRA) with the one-file training loop."""
    cfg = _config_or_help(config, overrides, help_config)
    if cfg is None:
        return
    from .train.loop import train

    run_training(lambda: train(cfg, console, resume=resume))


@app.command("merge")
def merge_cmd(
    model: Annotated[str, typer.Argument(help="A peft adapter dir (or a tuned model dir with --interpolate)")],
    out: Annotated[Path, typer.Option("--out", help="Output HF model directory")],
    interpolate: Annotated[Optional[float], typer.Option("--interpolate", help="α in θ=(1-α)θ_base+αθ_tuned (WiSE-FT)")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model for --interpolate (default: the adapter's base or the run's model.path)")] = None,
):
    """Merge a LoRA adapter into its base, or interpolate tuned and base weights."""
    from . import models

    def go():
        if interpolate is None:
            path = models.merge_adapter(model, out)
        else:
            path = models.interpolate(base or models.base_of(model), model, interpolate, out)
        console.print(f"[green]done[/] wrote {path}", highlight=False)

    run_guarded(go)


# ---- data split / eval / report -----------------------------------------------------------------------------
@data_app.command("split")
def data_split(
    data: Annotated[list[str], typer.Argument(help="Files, directories, globs or saved datasets")],
    out: Annotated[Path, typer.Option("--out", help="Output dir: train.jsonl, heldout-instances.jsonl, heldout-tasks.jsonl, split.json")],
    by: Annotated[str, typer.Option("--by", help="Split unit (only 'task')")] = "task",
    holdout: Annotated[Optional[str], typer.Option("--holdout", help="Comma-separated tasks to hold out")] = None,
    holdout_cluster: Annotated[Optional[str], typer.Option("--holdout-cluster", help="Comma-separated clusters to hold out (task map with 'cluster')")] = None,
    holdout_fraction: Annotated[Optional[float], typer.Option("--holdout-fraction", help="Share of tasks held out, chosen with --seed")] = None,
    instance_fraction: Annotated[float, typer.Option("--instance-fraction", help="Share of each training task's examples in heldout-instances")] = 0.1,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same split)")] = 0,
    fmt: FormatOpt = D.format, strip: StripOpt = None, task_map: TaskMapOpt = D.task_map, task_field: TaskFieldOpt = D.task_field,
    skip_invalid: SkipOpt = D.skip_invalid, dedup: DedupOpt = D.dedup,
):
    """Split data into train / held-out instances (same tasks) / held-out tasks (unseen tasks)."""
    from .data.split import SplitOptions, write_split

    def go():
        opts = data_config(format=fmt, task_field=task_field, task_map=task_map, strip=strip,
                           skip_invalid=skip_invalid, dedup=dedup)
        names = lambda s: tuple(x.strip() for x in (s or "").split(",") if x.strip())  # noqa: E731
        split = SplitOptions(by=by, holdout=names(holdout), holdout_cluster=names(holdout_cluster),
                             holdout_fraction=holdout_fraction, instance_fraction=instance_fraction, seed=seed)
        return write_split(data, opts, split, out, console)

    run_guarded(go)


@app.command("eval")
def eval_cmd(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", help="Output dir: metrics.json, examples.jsonl")],
    data: list[str] = flag(EvalConfig, "data"),
    base: Annotated[Optional[str], typer.Option("--base", help="Base model to compare with (deltas with 95% CIs)")] = None,
    general: list[str] = flag(EvalConfig, "general"),
    text: list[str] = flag(EvalConfig, "text"),
    limit: Optional[int] = flag(EvalConfig, "limit"),
    general_limit: Optional[int] = flag(EvalConfig, "general_limit"),
    question_field: str = flag(EvalConfig, "question_field"),
    answer_field: str = flag(EvalConfig, "answer_field"),
    qa_prompt: str = flag(EvalConfig, "qa_prompt"),
    few_shot: int = flag(EvalConfig, "few_shot"),
    generations: int = flag(EvalConfig, "generations"),
    max_new_tokens: int = flag(EvalConfig, "max_new_tokens"),
    qa_max_new_tokens: int = flag(EvalConfig, "qa_max_new_tokens"),
    batch_size: int = flag(EvalConfig, "batch_size"),
    forward_batch_tokens: int = flag(EvalConfig, "forward_batch_tokens"),
    max_labels: int = flag(EvalConfig, "max_labels"),
    text_window: int = flag(EvalConfig, "text_window"),
    text_field: str = flag(EvalConfig, "text_field"),
    bootstrap: int = flag(EvalConfig, "bootstrap"),
    seed: int = flag(EvalConfig, "seed"),
    dtype: str = flag(ModelConfig, "dtype"),
    fmt: FormatOpt = D.format, template: TemplateOpt = D.template, max_length: MaxLenOpt = D.max_length,
    truncation: TruncOpt = D.truncation, loss_on: LossOnOpt = D.loss_on, strip: StripOpt = None,
    task_map: TaskMapOpt = D.task_map, task_field: TaskFieldOpt = D.task_field, skip_invalid: SkipOpt = D.skip_invalid,
):
    """Task metrics, general-knowledge probe, perplexity; base vs model deltas; writes DIR/metrics.json."""
    from .evaluate.evaluate import evaluate

    def go():
        cfg = EvalConfig(data=data, general=general, text=text, limit=limit, general_limit=general_limit,
                         question_field=question_field, answer_field=answer_field, qa_prompt=qa_prompt,
                         few_shot=few_shot, generations=generations, max_new_tokens=max_new_tokens,
                         qa_max_new_tokens=qa_max_new_tokens, batch_size=batch_size,
                         forward_batch_tokens=forward_batch_tokens, max_labels=max_labels, text_window=text_window,
                         text_field=text_field, bootstrap=bootstrap, seed=seed)
        data_opts = data_config(format=fmt, template=template, max_length=max_length, truncation=truncation,
                                loss_on=loss_on, strip=strip, task_map=task_map, task_field=task_field,
                                skip_invalid=skip_invalid)
        return evaluate(cfg, model, out, data_opts, base=base, dtype=dtype, console=console)

    run_guarded(go)


@app.command("report")
def report_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (or eval/audit output directories)")],
    out: Annotated[Path, typer.Option("--out", help="Output HTML file (self-contained)")] = Path("report.html"),
    generations: Annotated[int, typer.Option("--generations", help="Side-by-side generations shown per run")] = 5,
):
    """One self-contained HTML report: audit, loss curves, per-task before/after, forgetting, trade-off."""
    from .report.html import write_report

    run_guarded(lambda: write_report(runs, out, console, generations=generations))


# ---- generate / chat ---------------------------------------------------------------------------------------
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", help="Most tokens generated per reply")]
SampleOpt = Annotated[bool, typer.Option("--do-sample/--greedy", help="Sample instead of greedy decoding")]
TempOpt = Annotated[float, typer.Option("--temperature", help="Sampling temperature (with --do-sample)")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (with --do-sample)")]


@app.command("generate")
def generate_cmd(
    model: Annotated[str, typer.Argument(help="HF model dir, a .gguf file, a peft adapter dir, or 'default'")],
    data: Annotated[list[str], typer.Option("--data", help="Data file(s) in any supported format (repeatable)")],
    out: Annotated[Path, typer.Option("--out", help="Output JSONL: {index, task, prompt, reference, generation}")],
    template: TemplateOpt = D.template, max_new_tokens: MaxNewOpt = 128, do_sample: SampleOpt = False,
    temperature: TempOpt = 1.0, top_p: TopPOpt = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per generation batch")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Random seed for --do-sample")] = 0,
    fmt: FormatOpt = D.format, task_map: TaskMapOpt = D.task_map, task_field: TaskFieldOpt = D.task_field,
    skip_invalid: SkipOpt = D.skip_invalid,
):
    """Batched replies for every example; a final assistant turn is dropped from the prompt and kept as reference."""
    from .evaluate.metrics import exact_match_of_generations
    from .generate import generate_file
    from .io import read_jsonl

    def go():
        opts = data_config(format=fmt, task_field=task_field, task_map=task_map, template=template,
                           skip_invalid=skip_invalid)
        summary = generate_file(data, model, out, opts, console, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed)
        rate, n_ref = exact_match_of_generations(read_jsonl(out))
        if rate is not None:
            console.print(f"exact match {rate:.1%} of {n_ref:,} with references", highlight=False)
        return summary

    run_guarded(go)


@app.command("chat")
def chat_cmd(
    model: Annotated[str, typer.Argument(help="HF model dir, a .gguf file, a peft adapter dir, or 'default'")],
    template: TemplateOpt = D.template,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt for the conversation")] = None,
    max_new_tokens: MaxNewOpt = 512, do_sample: SampleOpt = False, temperature: TempOpt = 1.0, top_p: TopPOpt = 1.0,
):
    """Interactive chat on stdin with streaming replies (same template as training); /reset, /exit."""
    from .chat import chat_loop
    from .data.template import resolve_template
    from .models import load_model, load_tokenizer

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def read_line() -> str | None:
        console.print("[bold cyan]>>> [/]", end="")
        line = sys.stdin.readline()
        return line if line else None  # "" is end of input

    def go():
        tokenizer = load_tokenizer(model)
        tmpl = resolve_template(template, tokenizer)
        lm = load_model(model)
        console.print(f"chat with [bold]{model}[/] (template {tmpl.name}); /reset clears the history, /exit or "
                      "Ctrl-D leaves", highlight=False)
        history = chat_loop(lm, tokenizer, tmpl, read_line, write, system=system, max_new_tokens=max_new_tokens,
                            do_sample=do_sample, temperature=temperature, top_p=top_p)
        console.print(f"[green]bye[/] ({sum(m['role'] == 'assistant' for m in history)} replies in the last "
                      "conversation)", highlight=False)

    run_guarded(go)


# ---- audit / select ---------------------------------------------------------------------------------------------
@app.command("audit")
def audit_cmd(
    data: Annotated[list[str], typer.Argument(help="Files, directories, globs or saved datasets")],
    out: Annotated[Path, typer.Option("--out", help="Audit directory: examples.jsonl, tasks.json, embeddings.npy, audit.json")],
    model: ModelOpt = "default", fmt: FormatOpt = D.format, template: TemplateOpt = D.template,
    max_length: MaxLenOpt = D.max_length, truncation: TruncOpt = D.truncation, strip: StripOpt = None,
    task_map: TaskMapOpt = D.task_map, task_field: TaskFieldOpt = D.task_field, skip_invalid: SkipOpt = D.skip_invalid,
    dedup: DedupOpt = D.dedup,
    few_shot: int = flag(AuditConfig, "few_shot"),
    few_shot_per_task: int = flag(AuditConfig, "few_shot_per_task"),
    generate: bool = flag(AuditConfig, "generate"),
    max_new_tokens: int = flag(AuditConfig, "max_new_tokens"),
    limit_per_task: Optional[int] = flag(AuditConfig, "limit_per_task"),
    dtype: str = flag(AuditConfig, "dtype"),
    forward_batch_tokens: int = flag(AuditConfig, "forward_batch_tokens"),
    max_batch_size: int = flag(AuditConfig, "max_batch_size"),
    chunk_examples: int = flag(AuditConfig, "chunk_examples"),
    seed: int = flag(AuditConfig, "seed"),
    known_match: float = flag(AuditConfig, "known_match"),
    known_nll: float = flag(AuditConfig, "known_nll"),
    latent_ratio: float = flag(AuditConfig, "latent_ratio"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard earlier results in --out instead of resuming")] = False,
):
    """Measure what the base model already knows: s_cond, s_uncond, IFD per example; verdicts per task."""
    from .audit.command import run_audit

    def go():
        cfg = AuditConfig(few_shot=few_shot, few_shot_per_task=few_shot_per_task, generate=generate,
                          max_new_tokens=max_new_tokens, limit_per_task=limit_per_task, dtype=dtype,
                          forward_batch_tokens=forward_batch_tokens, max_batch_size=max_batch_size,
                          chunk_examples=chunk_examples, seed=seed, known_match=known_match, known_nll=known_nll,
                          latent_ratio=latent_ratio)
        dopts = data_config(format=fmt, template=template, max_length=max_length, truncation=truncation,
                            loss_on="last_assistant", strip=strip, task_map=task_map, task_field=task_field,
                            skip_invalid=skip_invalid, dedup=dedup)
        return run_audit(data, out, cfg, dopts, model, overwrite, console)

    run_guarded(go)


@app.command("select")
def select_cmd(
    audit_dir: Annotated[Path, typer.Argument(help="Directory written by `sftlab audit`")],
    out: Annotated[Path, typer.Option("--out", help="Output JSONL (messages format with task labels)")],
    strategy: Annotated[str, typer.Option("--strategy", help="ifd-top | drop-known | task-balanced | diverse")],
    budget: Annotated[str, typer.Option("--budget", help="Examples to keep: N or P% of the audited examples")],
    seed: Annotated[int, typer.Option("--seed", help="Seed for the random order within strategies")] = 0,
    dup_threshold: Annotated[float, typer.Option("--dup-threshold", help="diverse: MinHash Jaccard at or above which examples are near-duplicates")] = 0.8,
):
    """Choose a training set from an audit; writes FILE.jsonl and FILE.summary.json (kept/dropped per task)."""
    from .select import run_select

    run_guarded(lambda: run_select(audit_dir, out, strategy, budget, console, seed=seed, dup_threshold=dup_threshold))


# ---- run: the whole pipeline --------------------------------------------------------------------------------
@app.command("run")
def run_cmd(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config (see configs/run-t0.yaml)")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="dotted key=value overrides, e.g. eval.limit=20")] = None,
    from_stage: Annotated[Optional[str], typer.Option("--from", help="Redo this stage and every later one: audit | select | train | eval | report")] = None,
    only: Annotated[Optional[str], typer.Option("--only", help="Redo only this stage (its input stages must be complete)")] = None,
    redo_changed: Annotated[bool, typer.Option("--redo-changed", help="Redo the audit or training when their settings changed, instead of stopping")] = False,
    help_config: HelpConfigOpt = False,
):
    """audit -> select -> train -> eval -> report in one run directory (output_dir); re-running resumes."""
    cfg = _config_or_help(config, overrides, help_config)
    if cfg is None:
        return
    from .runner import run_pipeline

    run_training(lambda: run_pipeline(cfg, console, from_stage=from_stage, only=only,
                                      on_change="redo" if redo_changed else "error"))


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", help="Run directory")] = Path("runs/demo"),
    model: ModelOpt = "default",
    overrides: Annotated[Optional[list[str]], typer.Argument(help="config overrides, e.g. train.epochs=2 eval.max_new_tokens=8")] = None,
):
    """The whole cycle on the embedded demo data (`sftlab run` with a built-in config): audit, train, held-out
    accuracy before and after, report."""
    from .demo import run_demo

    run_guarded(lambda: run_demo(out, model, overrides or [], console))

