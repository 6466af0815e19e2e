"""`sftlab ifeval score`: IFEval figures for a responses file from any system (sftlab/ifeval does the work)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import app, console, run_guarded

ifeval_app = typer.Typer(no_args_is_help=True, help="IFEval: score responses with the verifiable-instruction checkers.")
app.add_typer(ifeval_app, name="ifeval")


@ifeval_app.command("score")
def score_cmd(
    responses: Annotated[Path, typer.Argument(help="JSONL of {\"prompt\", \"response\"} (the upstream format)")],
    inputs: Annotated[Path, typer.Option("--inputs", help="IFEval input_data.jsonl the responses answer (e.g. ../shared/data/ifeval/input_data.jsonl)")],
    partial: Annotated[bool, typer.Option("--partial", help="Score only the prompts that have a response")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as one JSON object on stdout")] = False,
    rows: Annotated[Optional[Path], typer.Option("--rows", help="Also write the per-prompt verdicts (JSONL)")] = None,
):
    """Prompt- and instruction-level accuracy, strict and loose, and per instruction type (fractions in --json)."""
    import json

    from ..io import atomic_write
    from ..ifeval.responses import score_file
    from ..ifeval.score import summary_lines

    result = run_guarded(lambda: score_file(responses, inputs, partial))
    if rows:
        with atomic_write(rows) as f:
            f.writelines(json.dumps(r) + "\n" for r in result["rows"])
    figs = {k: v for k, v in result.items() if k != "rows"}
    if as_json:
        print(json.dumps(figs))
    else:
        console.print("\n".join(summary_lines(figs)), highlight=False, markup=False)
