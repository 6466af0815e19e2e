"""The audit directory: the settings fingerprint, the partial files a rerun resumes from, and the final files.

While running, finished examples are appended to `examples.partial.jsonl` and their embeddings saved in
`embeddings.partial/` (one .npz per chunk); a rerun with the same settings skips every example already in
`examples.jsonl` or the partial files (matched by index and conversation hash). The final files
(`examples.jsonl`, `embeddings.npy`, `tasks.json`, `audit.json`; schema in docs/audit.md) are written
atomically and the partial ones removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ..config import AuditConfig
from ..config import DataConfig
from ..io import atomic_write, read_jsonl
from .items import AuditItem, audit_data_options

AUDIT_VERSION = 1
PARTIAL_ROWS, PARTIAL_EMBEDDINGS = "examples.partial.jsonl", "embeddings.partial"
FINAL_FILES = ("examples.jsonl", "embeddings.npy", "tasks.json")


def audit_config(inputs, cfg: AuditConfig, data: DataConfig, model: str, model_path: str) -> dict:
    """Every setting that changes a number (audit.json `config`): a rerun resumes only if it matches."""
    from ..data.load import expand_paths

    d = audit_data_options(data)
    return {"version": AUDIT_VERSION, "data": [str(p.resolve()) for p in expand_paths(inputs)],
            "model": model, "model_path": model_path, "dtype": cfg.dtype, "template": d.template,
            "format": d.format, "task_field": d.task_field,
            "task_map": str(Path(d.task_map).resolve()) if d.task_map else None, "strip": list(d.strip),
            "skip_invalid": d.skip_invalid, "dedup": d.dedup, "max_length": d.max_length,
            "truncation": d.truncation, "few_shot": cfg.few_shot,
            "few_shot_per_task": cfg.few_shot_per_task, "generate": cfg.generate,
            "max_new_tokens": cfg.max_new_tokens, "limit_per_task": cfg.limit_per_task, "seed": cfg.seed}


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line left unfinished by an interruption, so that appending starts on a line of its own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def load_previous(out_dir: Path, items: list[AuditItem], config: dict, overwrite: bool) -> tuple[dict, dict]:
    """Rows and embeddings of examples a previous run with the same settings finished: ({index: row}, {index: vec}).

    With `overwrite`, or nothing to resume, every earlier result in `out_dir` is removed instead."""
    meta_path = out_dir / "audit.json"
    partial_rows, partial_emb = out_dir / PARTIAL_ROWS, out_dir / PARTIAL_EMBEDDINGS
    old_rows = (read_jsonl(out_dir / "examples.jsonl", tolerate_torn_tail=True)
                + read_jsonl(partial_rows, tolerate_torn_tail=True))
    if overwrite or not old_rows:
        for name in (*FINAL_FILES, PARTIAL_ROWS):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(partial_emb, ignore_errors=True)
        return {}, {}
    old = json.loads(meta_path.read_text()).get("config") if meta_path.is_file() else None
    if old != config:
        diff = sorted(k for k in set(config) | set(old or {}) if (old or {}).get(k) != config.get(k))
        raise ValueError(f"{out_dir} holds an audit made with different settings ({', '.join(diff)}); "
                         "use another --out or pass --overwrite")
    _drop_torn_tail(partial_rows)
    keys = {it.index: it.key for it in items}
    rows = {r["index"]: r for r in old_rows if keys.get(r.get("index")) == r.get("key")}
    emb: dict = {}
    npy = out_dir / "embeddings.npy"
    if npy.is_file():
        arr = np.load(npy)
        emb.update({i: arr[i] for i in rows if i < len(arr)})
    if partial_emb.is_dir():
        for f in sorted(partial_emb.glob("*.npz")):
            with np.load(f) as z:
                emb.update({int(i): v for i, v in zip(z["index"], z["emb"])})
    done = {i: r for i, r in rows.items() if i in emb}
    return done, {i: emb[i] for i in done}


def write_meta(out_dir: Path, meta: dict) -> None:
    with atomic_write(out_dir / "audit.json") as f:
        json.dump(meta, f, indent=2)


def save_chunk(out_dir: Path, k: int, rows: list[dict], pooled: dict[int, np.ndarray], fp) -> dict[int, np.ndarray]:
    """Chunk k's embeddings into `embeddings.partial/` (atomically), then its rows appended to `fp` (the open
    partial rows file); returns {index: embedding}."""
    idx = np.array([r["index"] for r in rows], dtype=np.int64)
    vecs = np.stack([pooled[i] for i in idx.tolist()])
    partial_emb = out_dir / PARTIAL_EMBEDDINGS
    partial_emb.mkdir(exist_ok=True)
    with atomic_write(partial_emb / f"chunk-{idx.min():08d}-{k:05d}.npz", "wb") as fe:
        np.savez(fe, index=idx, emb=vecs)
    for r in rows:
        fp.write(json.dumps(r, ensure_ascii=False) + "\n")
    fp.flush()
    return {int(i): v for i, v in zip(idx, vecs)}


def write_final(out_dir: Path, rows: list[dict], embeddings: np.ndarray, summary: dict) -> None:
    """examples.jsonl, embeddings.npy and tasks.json, each atomically."""
    with atomic_write(out_dir / "examples.jsonl") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with atomic_write(out_dir / "embeddings.npy", "wb") as f:
        np.save(f, embeddings.astype(np.float32))
    with atomic_write(out_dir / "tasks.json") as f:
        json.dump(summary, f, indent=2)


def remove_partial(out_dir: Path) -> None:
    (out_dir / PARTIAL_ROWS).unlink(missing_ok=True)
    shutil.rmtree(out_dir / PARTIAL_EMBEDDINGS, ignore_errors=True)
