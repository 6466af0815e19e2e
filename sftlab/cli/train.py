"""`sftlab train | merge | run | demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import HelpConfigOpt, ModelOpt, app, config_or_help, console, run_guarded, run_training

ConfigArg = Annotated[Optional[Path], typer.Argument(help="YAML config (see configs/)")]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(help="dotted key=value overrides, e.g. train.lr=1e-5")]


@app.command("train")
def train_cmd(
    config: ConfigArg = None, overrides: OverridesArg = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from the last checkpoint in output_dir")] = True,
    help_config: HelpConfigOpt = False,
):
    """Fine-tune (full or LoRA) with the one-file training loop."""
    cfg = config_or_help(config, overrides, help_config)
    if cfg is None:
        return
    from ..train.loop import train

    run_training(lambda: train(cfg, console, resume=resume))


@app.command("merge")
def merge_cmd(
    model: Annotated[str, typer.Argument(help="A peft adapter dir (or a tuned model dir with --interpolate)")],
    out: Annotated[Path, typer.Option("--out", help="Output HF model directory")],
    interpolate: Annotated[Optional[float], typer.Option("--interpolate", help="α in θ=(1-α)θ_base+αθ_tuned (WiSE-FT)")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model for --interpolate (default: the adapter's base or the run's model.path)")] = None,
):
    """Merge a LoRA adapter into its base, or interpolate tuned and base weights."""
    from .. import models

    def go():
        if interpolate is None:
            path = models.merge_adapter(model, out)
        else:
            path = models.interpolate(base or models.base_of(model), model, interpolate, out)
        console.print(f"[green]done[/] wrote {path}", highlight=False)

    run_guarded(go)


@app.command("run")
def run_cmd(
    config: ConfigArg = None, overrides: OverridesArg = None,
    from_stage: Annotated[Optional[str], typer.Option("--from", help="Redo this stage and every later one: audit | select | train | eval | report")] = None,
    only: Annotated[Optional[str], typer.Option("--only", help="Redo only this stage (its input stages must be complete)")] = None,
    redo_changed: Annotated[bool, typer.Option("--redo-changed", help="Redo the audit or training when their settings changed, instead of stopping")] = False,
    help_config: HelpConfigOpt = False,
):
    """audit -> select -> train -> eval -> report in one run directory (output_dir); re-running resumes."""
    cfg = config_or_help(config, overrides, help_config)
    if cfg is None:
        return
    from ..runner import run_pipeline

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
    from ..demo import run_demo

    run_training(lambda: run_demo(out, model, overrides or [], console))
