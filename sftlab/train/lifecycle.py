"""A training run's life around the steps: whether its outputs are already complete, stop signals (SIGTERM,
SIGINT, SIGUSR1: what SLURM and Kubernetes send before a kill) and the exception that reports an interruption."""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
from pathlib import Path

import torch

from ..config import RunConfig, dump_config

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class TrainingInterrupted(RuntimeError):
    """A stop signal arrived; the step in progress finished and `checkpoint` holds it."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path):
        super().__init__(f"{signal_name} at step {step}: stopped after writing {checkpoint}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(dump_config(cfg).encode()).hexdigest()


def completed(out: Path, cfg: RunConfig):
    """The result of a finished run of this same config in `out` (summary.json written last), else None."""
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model_dir = Path(summary.get("model_dir", ""))
    if summary.get("config_sha256") != config_hash(cfg) or not model_dir.is_dir():
        return None
    from .loop import TrainResult

    return TrainResult(out, summary["steps"], summary["final_loss"], summary["eval_loss"],
                       summary["initial_eval_loss"], summary["train_examples"], summary["weight_change"], model_dir)


@contextlib.contextmanager
def stop_signals():
    """While the block runs, the first SIGTERM/SIGINT/SIGUSR1 is recorded (`stop["signal"]`) for the loop to stop
    after the step in progress; a second one raises at once. Outside the main thread nothing is installed."""
    stop: dict = {"signal": None}

    def handler(signum, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        stop["signal"] = signal.Signals(signum).name

    try:
        previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stop_requested(accelerator, stop: dict) -> bool:
    """Whether any process received a stop signal (processes agree, so all stop after the same step)."""
    flag = torch.tensor([1.0 if stop["signal"] else 0.0])
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag.to(accelerator.device), reduction="sum").cpu()
    return bool(flag.item())
