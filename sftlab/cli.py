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


def data_options(fmt, template, max_length, truncation, loss_on, prompt_loss_weight, strip, task_map, task_field,
                 skip_invalid, dedup):
    from .data.pipeline import DataOptions
    from .data.tokenize import TokenizeOptions

    return DataOptions(format=fmt, task_field=task_field, task_map=str(task_map) if task_map else None,
                       strip=tuple(strip or ()), template=template, skip_invalid=skip_invalid, dedup=dedup,
                       tokenize=TokenizeOptions(max_length=max_length, truncation=truncation, loss_on=loss_on,
                                                prompt_loss_weight=prompt_loss_weight))


def fail(message: str, code: int = 1):
    console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def run_guarded(fn):
    """Turn expected user errors into one clear line and a non-zero exit."""
    from .data.template import TemplateError
    from .data.validate import DataError
    from .models import ModelError

    try:
        return fn()
    except (DataError, TemplateError, ModelError, FileNotFoundError, ValueError) as e:
        fail(str(e).replace("[", "\\["))


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


def main():  # pragma: no cover
    sys.exit(app())
