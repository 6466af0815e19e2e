"""sftlab command line: parses arguments and calls library functions (every command has a Python API)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Supervised instruction fine-tuning: audit what the model knows, train, evaluate, report.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect, tokenize and split instruction data.")
app.add_typer(data_app, name="data")
console = Console(stderr=True)

# ---- shared options (the same names as the config keys) -------------------------------------------------
HelpConfigOpt = Annotated[bool, typer.Option("--help-config", help="List every config key with default and description")]
ModelOpt = Annotated[str, typer.Option("--model", help="HF model dir, a .gguf file, or 'default' (SmolLM2-135M-Instruct)")]
FormatOpt = Annotated[Optional[str], typer.Option("--format", help="alpaca | prompt_completion | messages | sharegpt (default: detect per file)")]
TemplateOpt = Annotated[str, typer.Option("--template", help="'default' (tokenizer's chat template), chatml, alpaca, or a .jinja file")]
MaxLenOpt = Annotated[Optional[int], typer.Option("--max-length", help="Maximum tokens per example")]
TruncOpt = Annotated[str, typer.Option("--truncation", help="truncate-prompt-left | drop")]
LossOnOpt = Annotated[str, typer.Option("--loss-on", help="assistant | last_assistant | all")]
PromptWOpt = Annotated[float, typer.Option("--prompt-loss-weight", help="Loss weight of non-response tokens, in [0, 1]")]
StripOpt = Annotated[Optional[list[str]], typer.Option("--strip", help="Trailing text to remove from responses (repeatable)")]
TaskMapOpt = Annotated[Optional[Path], typer.Option("--task-map", help="JSON: file stem -> task (or -> {task: ...})")]
TaskFieldOpt = Annotated[Optional[str], typer.Option("--task-field", help="Record field holding the task label")]
SkipOpt = Annotated[bool, typer.Option("--skip-invalid", help="Skip invalid records and report counts per reason")]
DedupOpt = Annotated[bool, typer.Option("--dedup", help="Drop exact duplicate conversations")]


def flag(section, name: str, *decls: str, **kwargs):
    """A typer option whose default and help are the config field's own: one definition per option, shared by
    YAML, `key=value` overrides, CLI flags and the Python API (`--max-new-tokens` for `max_new_tokens`)."""
    field = section.model_fields[name]
    default = field.default_factory() if field.default_factory else field.default
    return typer.Option(default, *(decls or (f"--{name.replace('_', '-')}",)), help=field.description, **kwargs)


def data_options(fmt, template, max_length, truncation, loss_on, prompt_loss_weight, strip, task_map, task_field,
                 skip_invalid, dedup):
    from .data.pipeline import DataOptions
    from .data.tokenize import TokenizeOptions

    return DataOptions(format=fmt, task_field=task_field, task_map=str(task_map) if task_map else None,
                       strip=tuple(strip or ()), template=template, skip_invalid=skip_invalid, dedup=dedup,
                       tokenize=TokenizeOptions(max_length=max_length, truncation=truncation, loss_on=loss_on,
                                                prompt_loss_weight=prompt_loss_weight))


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


def run_training(fn):
    """`run_guarded`, plus a diverged training (non-finite loss) reported as one clear line."""
    from .train.loop import TrainingDiverged

    def go():
        try:
            return fn()
        except TrainingDiverged as e:
            fail(str(e))

    return run_guarded(go)


# ---- data -------------------------------------------------------------------------------------------------
@data_app.command("tokenize")
def data_tokenize(
    data: Annotated[list[str], typer.Argument(help="Files, directories, globs or saved datasets")],
    out: Annotated[Path, typer.Option("--out", help="Output JSONL: {task, input_ids, labels} per example")],
    model: ModelOpt = "default", fmt: FormatOpt = None, template: TemplateOpt = "default",
    max_length: MaxLenOpt = None, truncation: TruncOpt = "truncate-prompt-left", loss_on: LossOnOpt = "assistant",
    prompt_loss_weight: PromptWOpt = 0.0, strip: StripOpt = None, task_map: TaskMapOpt = None,
    task_field: TaskFieldOpt = None, skip_invalid: SkipOpt = False, dedup: DedupOpt = False,
):
    """Write exactly the (unpacked) tensors training will see, one line per example in input order."""
    from .data.stats import tokenize_to_file

    def go():
        opts = data_options(fmt, template, max_length, truncation, loss_on, prompt_loss_weight, strip, task_map,
                            task_field, skip_invalid, dedup)
        return tokenize_to_file(data, model, opts, out, console)

    run_guarded(go)


@data_app.command("inspect")
def data_inspect(
    data: Annotated[list[str], typer.Argument(help="Files, directories, globs or saved datasets")],
    model: ModelOpt = "default", fmt: FormatOpt = None, template: TemplateOpt = "default",
    max_length: MaxLenOpt = None, truncation: TruncOpt = "truncate-prompt-left", loss_on: LossOnOpt = "assistant",
    prompt_loss_weight: PromptWOpt = 0.0, strip: StripOpt = None, task_map: TaskMapOpt = None,
    task_field: TaskFieldOpt = None, dedup: DedupOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON on stdout")] = False,
):
    """Counts per format and task, token lengths, trained fraction, invalid records, special-token warnings."""
    from .data.stats import inspect_data

    def go():
        # inspect reports invalid records instead of stopping at the first one
        opts = data_options(fmt, template, max_length, truncation, loss_on, prompt_loss_weight, strip, task_map,
                            task_field, True, dedup)
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
            path = models.interpolate(base or _base_of(model), model, interpolate, out)
        console.print(f"[green]done[/] wrote {path}", highlight=False)

    run_guarded(go)


def _base_of(model: str) -> str:
    import json

    import yaml

    p = Path(model)
    if (p / "adapter_config.json").is_file():
        return json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
    if (p / "sftlab_train_config.yaml").is_file():
        return yaml.safe_load((p / "sftlab_train_config.yaml").read_text())["model"]["path"]
    raise ValueError(f"{model}: cannot tell its base model; pass --base")


# ---- data split / eval / report (issue 5) ---------------------------------------------------------------------
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
    fmt: FormatOpt = None, strip: StripOpt = None, task_map: TaskMapOpt = None, task_field: TaskFieldOpt = None,
    skip_invalid: SkipOpt = False, dedup: DedupOpt = False,
):
    """Split data into train / held-out instances (same tasks) / held-out tasks (unseen tasks)."""
    from .data.pipeline import DataOptions
    from .evaluate.generalization import SplitOptions, write_split

    def go():
        opts = DataOptions(format=fmt, task_field=task_field, task_map=str(task_map) if task_map else None,
                           strip=tuple(strip or ()), skip_invalid=skip_invalid, dedup=dedup)
        names = lambda s: tuple(x.strip() for x in (s or "").split(",") if x.strip())  # noqa: E731
        split = SplitOptions(by=by, holdout=names(holdout), holdout_cluster=names(holdout_cluster),
                             holdout_fraction=holdout_fraction, instance_fraction=instance_fraction, seed=seed)
        return write_split(data, opts, split, out, console)

    run_guarded(go)


@app.command("eval")
def eval_cmd(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", help="Output dir: metrics.json, examples.jsonl")],
    data: Annotated[Optional[list[str]], typer.Option("--data", help="Task data (any supported format; repeatable)")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model to compare with (deltas with 95% CIs)")] = None,
    general: Annotated[Optional[list[str]], typer.Option("--general", help="General-knowledge QA file(s) (repeatable)")] = None,
    text: Annotated[Optional[list[str]], typer.Option("--text", help="Plain-text file(s) for perplexity (.txt, or JSONL with 'text')")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Seeded random sample of N valid examples per file (file order kept)")] = None,
    general_limit: Annotated[Optional[int], typer.Option("--general-limit", help="First N questions per --general file (default: --limit)")] = None,
    question_field: Annotated[str, typer.Option("--question-field", help="QA question field")] = "question",
    answer_field: Annotated[str, typer.Option("--answer-field", help="QA gold answer field (string or list)")] = "answer",
    qa_prompt: Annotated[str, typer.Option("--qa-prompt", help="User message for a QA probe, with {question}")] = "{question}",
    few_shot: Annotated[int, typer.Option("--few-shot", help="K: base with K shots vs model zero-shot on held-out tasks")] = 0,
    generations: Annotated[int, typer.Option("--generations", help="Side-by-side generations kept in metrics.json")] = 5,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Generation budget for task data")] = 64,
    qa_max_new_tokens: Annotated[int, typer.Option("--qa-max-new-tokens", help="Generation budget for QA probes")] = 32,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per generation batch")] = 8,
    batch_tokens: Annotated[int, typer.Option("--batch-tokens", help="Padded tokens per NLL forward pass")] = 4096,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples for the CIs")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed for bootstrap and few-shot demonstrations")] = 0,
    fmt: FormatOpt = None, template: TemplateOpt = "default", max_length: MaxLenOpt = None,
    truncation: TruncOpt = "truncate-prompt-left", loss_on: LossOnOpt = "assistant", strip: StripOpt = None,
    task_map: TaskMapOpt = None, task_field: TaskFieldOpt = None, skip_invalid: SkipOpt = False,
):
    """Task metrics, general-knowledge probe, perplexity; base vs model deltas; writes DIR/metrics.json."""
    from .evaluate.run import EvalOptions, evaluate

    def go():
        opts = EvalOptions(
            model=model, out=out, data=list(data or []), base=base, general=list(general or []),
            text=list(text or []), limit=limit, general_limit=general_limit, question_field=question_field,
            answer_field=answer_field,
            qa_prompt=qa_prompt, few_shot=few_shot, generations=generations, max_new_tokens=max_new_tokens,
            qa_max_new_tokens=qa_max_new_tokens, batch_size=batch_size, batch_tokens=batch_tokens,
            bootstrap=bootstrap, seed=seed,
            data_opts=data_options(fmt, template, max_length, truncation, loss_on, 0.0, strip, task_map, task_field,
                                   skip_invalid, False))
        return evaluate(opts, console)

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
    template: TemplateOpt = "default", max_new_tokens: MaxNewOpt = 128, do_sample: SampleOpt = False,
    temperature: TempOpt = 1.0, top_p: TopPOpt = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per generation batch")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Random seed for --do-sample")] = 0,
    fmt: FormatOpt = None, task_map: TaskMapOpt = None, task_field: TaskFieldOpt = None,
    skip_invalid: SkipOpt = False,
):
    """Batched replies for every example; a final assistant turn is dropped from the prompt and kept as reference."""
    from .data.pipeline import DataOptions
    from .generate import generate_file

    def go():
        opts = DataOptions(format=fmt, task_field=task_field, task_map=str(task_map) if task_map else None,
                           template=template, skip_invalid=skip_invalid)
        return generate_file(data, model, out, opts, console, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed)

    run_guarded(go)


@app.command("chat")
def chat_cmd(
    model: Annotated[str, typer.Argument(help="HF model dir, a .gguf file, a peft adapter dir, or 'default'")],
    template: TemplateOpt = "default",
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
    model: ModelOpt = "default", fmt: FormatOpt = None, template: TemplateOpt = "default",
    max_length: MaxLenOpt = None, truncation: TruncOpt = "truncate-prompt-left", strip: StripOpt = None,
    task_map: TaskMapOpt = None, task_field: TaskFieldOpt = None, skip_invalid: SkipOpt = False,
    dedup: DedupOpt = False,
    few_shot: Annotated[int, typer.Option("--few-shot", help="K solved examples of the same task before the prompt (few-shot baseline; 0: off)")] = 0,
    few_shot_per_task: Annotated[int, typer.Option("--few-shot-per-task", help="Examples per task that get the few-shot baseline")] = 50,
    generate: Annotated[bool, typer.Option("--generate", help="Greedy answers with normalised exact match and ROUGE-L")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Cap on generated tokens (also n_response_tokens + 16)")] = 64,
    limit_per_task: Annotated[Optional[int], typer.Option("--limit-per-task", help="Audit a seeded uniform sample of N examples per task")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="fp32 (exact) | bf16 (autocast; NLLs still from fp32 logits)")] = "fp32",
    batch_tokens: Annotated[int, typer.Option("--batch-tokens", help="Padded tokens per forward batch")] = 8192,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the per-task sample and the choice of shots")] = 0,
    known_match: Annotated[float, typer.Option("--known-match", help="Verdict 'known' at greedy exact match >= this")] = 0.5,
    known_nll: Annotated[float, typer.Option("--known-nll", help="Verdict 'known' at median s_cond <= this (nats/token)")] = 0.5,
    latent_ratio: Annotated[float, typer.Option("--latent-ratio", help="Verdict 'latent' at median IFD or few-shot ratio <= this")] = 0.6,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard earlier results in --out instead of resuming")] = False,
):
    """Measure what the base model already knows: s_cond, s_uncond, IFD per example; verdicts per task."""
    from .audit import AuditOptions, Thresholds, run_audit

    def go():
        if task_map and task_field:
            raise ValueError("pass either --task-map or --task-field, not both")
        opts = AuditOptions(model=model, dtype=dtype, few_shot=few_shot, few_shot_per_task=few_shot_per_task,
                            generate=generate, max_new_tokens=max_new_tokens, limit_per_task=limit_per_task,
                            seed=seed, batch_tokens=batch_tokens, overwrite=overwrite,
                            thresholds=Thresholds(known_match, known_nll, latent_ratio))
        dopts = data_options(fmt, template, max_length, truncation, "last_assistant", 0.0, strip, task_map,
                             task_field, skip_invalid, dedup)
        return run_audit(data, out, opts, dopts, console)

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


# ---- run: the whole pipeline (issue 5) --------------------------------------------------------------------------
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


def main():  # pragma: no cover
    sys.exit(app())


# ---- ifeval: score instruction-following responses from any system (the commands: sftlab/ifeval/command.py) -----
from .ifeval.command import ifeval_app  # noqa: E402  (the sub-app's one block, at the end)

app.add_typer(ifeval_app, name="ifeval")
