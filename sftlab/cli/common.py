"""The CLI's shared parts: the typer apps, the console, and turning expected errors into one clear line."""

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

HelpConfigOpt = Annotated[bool, typer.Option("--help-config", help="List every config key with default and description")]
ModelOpt = Annotated[str, typer.Option("--model", help="HF model dir, a .gguf file, or 'default' (SmolLM2-135M-Instruct)")]
DataArg = Annotated[list[str], typer.Argument(help="Files, directories, globs or saved datasets")]


def fail(message: str, code: int = 1):
    # soft_wrap: one unbroken line, so `FILE:LINE: reason` stays greppable however narrow the terminal
    console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def run_guarded(fn):
    """Turn expected user errors into one clear line and a non-zero exit."""
    from ..data.template import TemplateError
    from ..data.validate import DataError
    from ..io import DirectoryBusy
    from ..models import ModelError

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # sftlab shows its own progress; HF's per-load bars are noise here
    try:
        return fn()
    except (DataError, TemplateError, ModelError, DirectoryBusy, OSError, ValueError) as e:  # OSError: disk full, ...
        fail(str(e).replace("[", "\\["))


EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal after a checkpoint; running the same command resumes


def run_training(fn):
    """`run_guarded`, plus a diverged training (non-finite loss), a checkpoint that could not be written and a busy
    output directory reported as one clear line; a stop signal ends with a checkpoint, a resume hint and exit code
    75."""
    import shlex

    from ..io import DirectoryBusy
    from ..train.checkpoint import CheckpointError
    from ..train.loop import TrainingDiverged, TrainingInterrupted

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


def config_or_help(config: Optional[Path], overrides: Optional[list[str]], help_config: bool):
    """The validated RunConfig of `CONFIG [key=value ...]` (the file may be left out), or None after --help-config."""
    from ..config import ConfigError, config_help, load_config

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
