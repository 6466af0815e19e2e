"""Streaming readers for JSONL, JSON arrays, CSV, Parquet, directories/globs, and `save_to_disk` datasets.

Each reader yields `(Location, record)` where record is a dict, or a `DataError` for a record that
could not be read; nothing is held in memory beyond the current batch (JSON arrays are parsed whole,
as the format requires).
"""

from __future__ import annotations

import csv
import glob as globlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from .validate import DataError, Location

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
BOM = b"\xef\xbb\xbf"
# Columns that hold message lists; in CSV they arrive as JSON text.
JSON_COLUMNS = ("messages", "conversations", "prompt", "completion")
# Of those, the ones that may also be plain strings: parsed only when the text is a JSON list of messages.
STRING_OR_JSON_COLUMNS = ("prompt", "completion")

csv.field_size_limit(sys.maxsize)


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _inside_hf_dataset(path: Path, root: Path | None = None) -> bool:
    """True for the files of a `save_to_disk` dataset (its .json metadata is not data)."""
    return any(_is_hf_dataset(d) for d in path.parents if root is None or d.is_relative_to(root))


def expand_paths(inputs: list[str | Path]) -> list[Path]:
    """Files (and saved datasets) named by the inputs: files, directories (recursive) or glob patterns."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if _is_hf_dataset(p):
            out.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in EXTENSIONS
                           and not _inside_hf_dataset(f, p))
            found += sorted(d for d in p.rglob("*") if _is_hf_dataset(d) and not _inside_hf_dataset(d, p))
            if not found:
                raise FileNotFoundError(f"{p}: directory has no .jsonl/.json/.csv/.parquet files")
            out.extend(found)
        elif p.is_file():
            if p.suffix not in EXTENSIONS:
                raise ValueError(f"{p}: unsupported file type {p.suffix!r} (use .jsonl, .json, .csv or .parquet)")
            out.append(p)
        elif any(c in str(item) for c in "*?["):
            found = sorted(Path(f) for f in globlib.glob(str(item), recursive=True)
                           if (Path(f).is_file() and Path(f).suffix in EXTENSIONS and not _inside_hf_dataset(Path(f)))
                           or _is_hf_dataset(Path(f)))
            if not found:
                raise FileNotFoundError(f"{item}: glob matches no data files")
            out.extend(found)
        else:
            raise FileNotFoundError(f"{item}: no such file or directory")
    return out


def _decode_utf8(raw: bytes, where: Location) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(where, "non_utf8", f"byte 0x{raw[e.start]:02x} at column {e.start + 1}") from None


def read_jsonl(path: Path) -> Iterator[tuple[Location, dict | DataError]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = Location(str(path), line=lineno)
            if lineno == 1 and raw.startswith(BOM):
                yield where, DataError(where, "bom", "save the file as UTF-8 without BOM")
                continue
            if not raw.strip():
                continue
            try:
                text = _decode_utf8(raw, where)
                obj = json.loads(text)
            except DataError as e:
                yield where, e
                continue
            except json.JSONDecodeError as e:
                yield where, DataError(where, "invalid_json", f"{e.msg} at column {e.colno}")
                continue
            yield where, obj


def read_json(path: Path) -> Iterator[tuple[Location, dict | DataError]]:
    raw = path.read_bytes()
    file_where = Location(str(path), line=1)
    if raw.startswith(BOM):
        yield file_where, DataError(file_where, "bom", "save the file as UTF-8 without BOM")
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = Location(str(path), line=raw[: e.start].count(b"\n") + 1)
        yield where, DataError(where, "non_utf8", f"byte 0x{raw[e.start]:02x}")
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        where = Location(str(path), line=e.lineno)
        yield where, DataError(where, "invalid_json", f"{e.msg} at column {e.colno}")
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        yield file_where, DataError(file_where, "wrong_type", "a .json file must hold an array of records")
        return
    for i, obj in enumerate(data):
        yield Location(str(path), index=i), obj


def read_csv(path: Path) -> Iterator[tuple[Location, dict | DataError]]:
    with open(path, "rb") as fb:
        if fb.read(3) == BOM:
            where = Location(str(path), line=1)
            yield where, DataError(where, "bom", "save the file as UTF-8 without BOM")
            return
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        last_line = 1 if reader.fieldnames is not None else 0
        for row in reader:
            # a quoted field may span lines: name the record's first line
            where, last_line = Location(str(path), line=last_line + 1), reader.line_num
            if any(isinstance(v, str) and any("\udc80" <= ch <= "\udcff" for ch in v) for v in row.values()):
                yield where, DataError(where, "non_utf8", "a field holds bytes that are not UTF-8")
                continue
            if None in row:
                yield where, DataError(where, "wrong_type", "row has more fields than the header")
                continue
            rec: dict = {}
            bad = None
            for k, v in row.items():
                if k in JSON_COLUMNS and isinstance(v, str) and v.lstrip().startswith("["):
                    try:
                        parsed = json.loads(v)
                    except json.JSONDecodeError as e:
                        if k in STRING_OR_JSON_COLUMNS:  # a prompt that merely starts with '['
                            parsed = v
                        else:
                            bad = DataError(where, "invalid_json", f"column {k!r}: {e.msg}")
                            break
                    is_messages = isinstance(parsed, list) and parsed and all(isinstance(m, dict) for m in parsed)
                    v = parsed if is_messages or k not in STRING_OR_JSON_COLUMNS else v
                rec[k] = v
            yield where, (bad if bad else rec)


def read_parquet(path: Path) -> Iterator[tuple[Location, dict | DataError]]:
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            yield Location(str(path), index=i), obj
            i += 1


def read_hf_dataset(path: Path) -> Iterator[tuple[Location, dict | DataError]]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path}: saved DatasetDict has splits {list(ds)}; pass the split directory")
        ds = ds["train"]
    for i, obj in enumerate(ds):
        yield Location(str(path), index=i), obj


READERS = {"jsonl": read_jsonl, "json": read_json, "csv": read_csv, "parquet": read_parquet}


def read_records(path: Path) -> Iterator[tuple[Location, dict | DataError]]:
    if _is_hf_dataset(path):
        return read_hf_dataset(path)
    return READERS[EXTENSIONS[path.suffix]](path)


def count_records(path: Path) -> int | None:
    """Cheap record count for progress bars (None where it would cost a parse)."""
    if _is_hf_dataset(path):
        return None
    kind = EXTENSIONS[path.suffix]
    if kind == "jsonl":
        n = 0
        with open(path, "rb") as f:
            for raw in f:
                n += bool(raw.strip())
        return n
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return None
