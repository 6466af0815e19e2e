"""Shared plumbing: atomic file writes, reading sftlab's own JSONL outputs, and the one rich progress bar.

Every command writes its final files through `atomic_write` (a temporary name renamed into place), so a
half-written file never looks complete, and shows its long steps with `progress` (a bar with an ETA).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def atomic_write(path: Path, mode: str = "w"):
    """Write to a temporary file beside `path` and rename it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_jsonl(path: Path, tolerate_torn_tail: bool = False) -> list[dict]:
    """The rows of a JSONL file sftlab wrote (missing file: no rows; blank lines skipped).

    A line that is not a JSON object is an error naming `FILE:LINE`, except, with `tolerate_torn_tail`, a last
    line cut short by an interruption of the process that was appending to it (resumable outputs)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows: list[dict] = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if tolerate_torn_tail and lineno == len(lines) and not line.endswith("\n"):
                break
            raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def progress(label: str, console: Console | None, unit: str = "", disable: bool = False) -> Progress:
    """The progress bar of every long step: label, bar, done/total, unit or info, elapsed, ETA.

    Use as `with progress(...) as p: bar = p.add_task(label, total=N, info="")`; `info` is free text updated
    with `p.update(bar, info=...)`."""
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn(unit or "{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, disable=disable)
