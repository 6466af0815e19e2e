"""Atomic, resumable checkpoints.

A checkpoint is written into `checkpoints/.step-N.tmp/`, every file fsynced, then renamed to
`checkpoints/step-N/` (rename is atomic on POSIX), so a crash mid-write leaves the previous checkpoint
intact and the partial one is ignored (and cleaned up) on resume. It holds the trainable parameters
(safetensors), the optimizer and scheduler states, every process's RNG states and the trainer state
(step, best eval, the length of metrics.jsonl at that step) so that `--resume` continues bit-exactly.

Nothing in a checkpoint is unpickled: tensors are safetensors, the optimizer and scheduler states are read with
`torch.load(weights_only=True)`, the Python and NumPy RNG states are JSON. A write that fails (disk full, quota)
removes its partial directory and raises `CheckpointError`, leaving the previous checkpoint as it was; a
checkpoint that cannot be read is reported by `load_checkpoint` before anything is changed, so the caller can fall
back to an older one.
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
from safetensors import SafetensorError
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


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names it and what was kept."""


def trainable_state(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # from named_parameters(), which lists tied weights once, as safetensors requires
    return {n: p.detach().cpu().contiguous() for n, p in params.items()}


def write_rng_state(tmp: Path, rank: int) -> None:
    """This process's RNG states: Python's and NumPy's as JSON, torch's (CPU, CUDA) as safetensors."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    (tmp / f"rng-{rank}.json").write_text(json.dumps(
        {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}))
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(tmp / f"rng-{rank}.safetensors"))


def read_rng_state(path: Path, rank: int) -> dict | None:
    if not (path / f"rng-{rank}.json").is_file():
        if (path / f"rng-{rank}.pt").is_file():
            raise ValueError("written by an older sftlab (pickled RNG state); resume is not exact from it")
        return None
    state = json.loads((path / f"rng-{rank}.json").read_text())
    state["tensors"] = load_file(str(path / f"rng-{rank}.safetensors"))
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = state["tensors"]
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(root: Path, step: int, params: dict[str, torch.Tensor], optimizer, scheduler,
                    trainer_state: dict, keep_last: int, rank: int = 0, world_size: int = 1,
                    barrier=lambda: None, sharded_optimizer: bool = False) -> Path:
    """Write checkpoint `step` atomically under `root/checkpoints` and prune to the last `keep_last`.

    params: the trainable parameters by name, whole (the model's, or their fp32 master copies; under FSDP gathered
    first, `sharding.gathered`). sharded_optimizer: every process writes its own shard of the optimizer state
    (`optimizer-RANK.pt`) instead of rank 0 writing the whole state."""
    ckpts = Path(root) / "checkpoints"
    tmp = ckpts / f".step-{step:08d}.tmp"
    final = ckpts / f"step-{step:08d}"
    if rank == 0:
        ckpts.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    try:
        write_rng_state(tmp, rank)
        if sharded_optimizer:
            from .sharding import local_optimizer_state

            torch.save(local_optimizer_state(optimizer), tmp / f"optimizer-{rank}.pt")
        if rank == 0:
            save_file(trainable_state(params), str(tmp / "trainable.safetensors"))
            if not sharded_optimizer:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps({**trainer_state, "world_size": world_size,
                                                        "optimizer_shards": world_size if sharded_optimizer else 0},
                                                       indent=2))
        barrier()
        if rank == 0:
            _fsync_tree(tmp)
    except (OSError, SafetensorError) as e:  # disk full, quota, file size limit (safetensors wraps the OS error)
        shutil.rmtree(tmp, ignore_errors=True)  # the partial directory goes, the previous checkpoint stays
        kept = list_checkpoints(root)
        intact = f"the previous checkpoint {kept[-1]} is intact" if kept else "no earlier checkpoint exists"
        reason = getattr(e, "strerror", None) or str(e).split("I/O error: ")[-1]
        raise CheckpointError(f"{final}: could not write the checkpoint ({reason}); {intact}") from None
    if rank == 0:
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


def read_checkpoint(path: Path, rank: int = 0) -> dict:
    """Every file of a checkpoint, read and checked, nothing applied: a `CheckpointError` for one that is
    truncated, corrupt or from another format."""
    try:
        state = json.loads((path / "state.json").read_text())
        optimizer = path / (f"optimizer-{rank}.pt" if state.get("optimizer_shards") else "optimizer.pt")
        return {"state": state,
                "tensors": load_file(str(path / "trainable.safetensors")),
                "optimizer": torch.load(optimizer, weights_only=True),
                "scheduler": torch.load(path / "scheduler.pt", weights_only=True),
                "rng": read_rng_state(path, rank)}
    except Exception as e:  # safetensors, json, torch and the OS each raise their own types
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None


def load_checkpoint(path: Path, params: dict[str, torch.Tensor], optimizer, scheduler, rank: int = 0) -> dict:
    """Restore the trainable parameters (by name), optimizer, scheduler and RNG in place; return the trainer state.
    Everything is read and checked before anything is changed."""
    ckpt = read_checkpoint(path, rank)
    tensors = ckpt["tensors"]
    missing = [n for n in params if n not in tensors]
    unexpected = [n for n in tensors if n not in params]
    if missing or unexpected:
        raise RuntimeError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}); was it written with another config?")
    from .sharding import load_sharded, restore_sharded_optimizer

    load_sharded(params, tensors)  # each process its own shards of a sharded (FSDP) parameter
    if ckpt["state"].get("optimizer_shards"):
        restore_sharded_optimizer(optimizer, ckpt["optimizer"])
    else:
        optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt["rng"] is not None:
        set_rng_state(ckpt["rng"])
    return ckpt["state"]
