"""Shared plumbing: atomic file writes, reading sftlab's own JSONL outputs, and the one rich progress bar.

Every command writes its final files through `atomic_write` (a temporary name renamed into place), so a
half-written file never looks complete, and shows its long steps with `progress` (a bar with an ETA).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
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


def progress(label: str, console: Console | None, unit: str = "", disable: bool = False) -> Progress | PlainProgress:
    """The progress bar of every long step: label, bar, done/total, unit or info, elapsed, ETA.

    Use as `with progress(...) as p: bar = p.add_task(label, total=N, info="")`; `info` is free text updated
    with `p.update(bar, info=...)`. On a console that is not a terminal (output redirected to a file, a batch
    job's log) a bar is never drawn: `PlainProgress` prints a plain line every `SFTLAB_LOG_EVERY` seconds
    (default 30) and when a task completes."""
    console = console or Console(stderr=True)
    if not console.is_terminal and not disable and not console.quiet:
        return PlainProgress(label, console, unit, float(os.environ.get("SFTLAB_LOG_EVERY", "30")))
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn(unit or "{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, disable=disable)


NATURAL_WIDTH = 400  # columns of a table console that is not a terminal: tables keep their natural width


def table_console() -> Console:
    """The console tables and results are printed on (stdout): a terminal's width, or — redirected to a file, as
    in a batch job — wide enough that tables keep their natural width instead of being cut at 80 columns."""
    c = Console()
    return c if c.is_terminal else Console(width=NATURAL_WIDTH)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class PlainProgress:
    """The progress API sftlab uses (`add_task`, `advance`, `update`, a context manager) as plain log lines:
    "label: done/total (pct) info, elapsed h:mm:ss, ETA h:mm:ss", at most every `every` seconds per task, and
    once when a task reaches its total."""

    def __init__(self, label: str, console: Console, unit: str = "", every: float = 30.0):
        self.label, self.console, self.unit, self.every = label, console, unit, every
        self.tasks: dict[int, dict] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description: str = "", total: float | None = None, completed: float = 0, **fields) -> int:
        now = time.monotonic()
        tid = len(self.tasks)
        self.tasks[tid] = {"description": description, "total": total, "completed": completed, "fields": fields,
                           "start": now, "last": now, "done": False}
        return tid

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, **fields) -> None:
        t = self.tasks[task_id]
        if total is not None:
            t["total"] = total
        if completed is not None:
            t["completed"] = completed
        if advance:
            t["completed"] += advance
        t["fields"].update({k: v for k, v in fields.items() if k != "description"})
        now = time.monotonic()
        finished = t["total"] is not None and t["completed"] >= t["total"] and not t["done"]
        if finished or (now - t["last"] >= self.every and not t["done"]):
            t["last"], t["done"] = now, finished
            self.console.print(self.line(t, now), highlight=False, markup=False, soft_wrap=True)

    def line(self, t: dict, now: float) -> str:
        elapsed = now - t["start"]
        done, total = t["completed"], t["total"]
        count = f"{done:,.0f}/{total:,.0f} ({100 * done / total:.0f}%)" if total else f"{done:,.0f}"
        eta = (f", ETA {_clock(elapsed * (total - done) / done)}" if total and 0 < done < total else "")
        info = self.unit or str(t["fields"].get("info", ""))
        name = t["description"] if t["description"] and t["description"] != self.label else ""
        return (f"{self.label}{' ' + name if name else ''}: {count}{' ' + info if info else ''}, "
                f"elapsed {_clock(elapsed)}{eta}")


class DirectoryBusy(RuntimeError):
    """Another live process is writing the output directory."""


@contextmanager
def output_lock(directory: Path):
    """One writer per output directory: an exclusive lock on DIR/.sftlab.lock for as long as the block runs.

    The lock is the OS's (flock), so it goes with the process that held it: a lock left by a killed process is
    free again and simply taken over. The file names the holder (pid and host) for the refusal message. A
    directory the lock created and nothing else wrote into is removed again (a command that failed at once leaves
    no empty output directory behind)."""
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".sftlab.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise DirectoryBusy(f"{directory}: another sftlab process ({holder}) is writing this directory; "
                                "wait for it, stop it, or choose another output directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
        if created and [p.name for p in directory.iterdir()] == [path.name]:  # nothing was written: leave no trace
            path.unlink(missing_ok=True)
            directory.rmdir()
