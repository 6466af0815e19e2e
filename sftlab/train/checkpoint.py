"""Atomic, resumable checkpoints.

A checkpoint is written into `checkpoints/.step-N.tmp/`, every file fsynced, then renamed to
`checkpoints/step-N/` (rename is atomic on POSIX), so a crash mid-write leaves the previous checkpoint
intact and the partial one is ignored (and cleaned up) on resume. It holds the trainable parameters
(safetensors), the optimizer and scheduler states, every process's RNG states and the trainer state
(step, data position, best eval) so that `--resume` continues bit-exactly.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_RE = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def trainable_state(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # from named_parameters(), which lists tied weights once, as safetensors requires
    return {n: p.detach().cpu().contiguous() for n, p in params.items()}


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, params: dict[str, torch.Tensor], optimizer, scheduler,
                    trainer_state: dict, keep_last: int, rank: int = 0, world_size: int = 1,
                    barrier=lambda: None) -> Path:
    """Write checkpoint `step` atomically under `root/checkpoints` and prune to the last `keep_last`.

    params: the trainable parameters by name (the model's, or their fp32 master copies)."""
    ckpts = Path(root) / "checkpoints"
    tmp = ckpts / f".step-{step:08d}.tmp"
    final = ckpts / f"step-{step:08d}"
    if rank == 0:
        ckpts.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    if rank == 0:
        save_file(trainable_state(params), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({**trainer_state, "world_size": world_size}, indent=2))
    barrier()
    if rank == 0:
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(ckpts)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (partial `.tmp` directories are never listed)."""
    ckpts = Path(root) / "checkpoints"
    if not ckpts.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in ckpts.iterdir()
             if d.is_dir() and (m := STEP_RE.match(d.name)) and (d / "state.json").is_file()]
    return [d for _, d in sorted(found)]


def remove_partial(root: Path) -> int:
    ckpts = Path(root) / "checkpoints"
    n = 0
    if ckpts.is_dir():
        for d in ckpts.glob(".step-*.tmp"):
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


def load_checkpoint(path: Path, params: dict[str, torch.Tensor], optimizer, scheduler, rank: int = 0) -> dict:
    """Restore the trainable parameters (by name), optimizer, scheduler and RNG in place; return the trainer state."""
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "trainable.safetensors"))
    missing = [n for n in params if n not in tensors]
    unexpected = [n for n in tensors if n not in params]
    if missing or unexpected:
        raise RuntimeError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}); was it written with another config?")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng-{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state
