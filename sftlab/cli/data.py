"""`sftlab data tokenize | inspect | split`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import DataConfig
from .common import DataArg, ModelOpt, console, data_app, run_guarded
from .options import data_flags, sections


@data_app.command("tokenize")
@sections(opts=data_flags())
def data_tokenize(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", help="Output JSONL: {task, input_ids, labels} per example")],
    model: ModelOpt = "default", opts: DataConfig = None,
):
    """Write exactly the (unpacked) tensors training will see, one line per example in input order."""
    from ..data.stats import tokenize_to_file

    run_guarded(lambda: tokenize_to_file(data, model, opts, out, console))


@data_app.command("inspect")
@sections(opts=data_flags(fixed={"skip_invalid": True}, cache=True))  # inspect reports invalid records, never stops
def data_inspect(
    data: DataArg, model: ModelOpt = "default",
    as_json: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON on stdout")] = False,
    opts: DataConfig = None,
):
    """Counts per format and task, token lengths, trained fraction, invalid records, special-token warnings."""
    from ..data.stats import inspect_data

    run_guarded(lambda: inspect_data(data, model, opts, console, as_json=as_json))


@data_app.command("prepare")
@sections(opts=data_flags(fixed={"cache": True}, skip=("cache_dir",), cache=True))
def data_prepare(
    data: DataArg,
    out: Annotated[Optional[Path], typer.Option("--out", help="Cache directory to prepare into (train with "
                                                "data.cache_dir=DIR); default: data.cache_dir's default")] = None,
    model: ModelOpt = "default", opts: DataConfig = None,
):
    """Tokenize once into the prepared-data cache that train and data inspect read (memory-mapped arrays keyed by
    the data's content, the tokenizer, the template and the data options)."""
    from ..data.prepared import prepare_command

    run_guarded(lambda: prepare_command(data, model, opts.model_copy(update={"cache_dir": str(out) if out else None}),
                                        console))


@data_app.command("split")
@sections(opts=data_flags(skip=("template", "max_length", "truncation", "loss_on", "prompt_loss_weight")))
def data_split(
    data: DataArg,
    out: Annotated[Path, typer.Option("--out", help="Output dir: train.jsonl, heldout-instances.jsonl, heldout-tasks.jsonl, split.json")],
    by: Annotated[str, typer.Option("--by", help="Split unit (only 'task')")] = "task",
    holdout: Annotated[Optional[str], typer.Option("--holdout", help="Comma-separated tasks to hold out")] = None,
    holdout_cluster: Annotated[Optional[str], typer.Option("--holdout-cluster", help="Comma-separated clusters to hold out (task map with 'cluster')")] = None,
    holdout_fraction: Annotated[Optional[float], typer.Option("--holdout-fraction", help="Share of tasks held out, chosen with --seed")] = None,
    instance_fraction: Annotated[float, typer.Option("--instance-fraction", help="Share of each training task's examples in heldout-instances")] = 0.1,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same split)")] = 0,
    opts: DataConfig = None,
):
    """Split data into train / held-out instances (same tasks) / held-out tasks (unseen tasks)."""
    from ..data.split import SplitOptions, write_split

    def go():
        names = lambda s: tuple(x.strip() for x in (s or "").split(",") if x.strip())  # noqa: E731
        split = SplitOptions(by=by, holdout=names(holdout), holdout_cluster=names(holdout_cluster),
                             holdout_fraction=holdout_fraction, instance_fraction=instance_fraction, seed=seed)
        return write_split(data, opts, split, out, console)

    run_guarded(go)
