"""Streaming readers for JSONL, JSON arrays, CSV, Parquet, directories/globs, and `save_to_disk` datasets.

Each reader yields `(Location, record)` where record is a dict, or a `DataError` for a record that
could not be read; nothing is held in memory beyond the current batch (JSON arrays are parsed whole,
as the format requires). JSONL, JSON and CSV may be compressed (`.gz`, `.bz2`, `.xz`, `.zst`): they are
read through the decompressor, with the line numbers of the decompressed text. A file that cannot be read at
all (corrupt Parquet or archive, a file that disappears while read) gives one `unreadable_file` error naming it.
"""

from __future__ import annotations

import bz2
import csv
import glob as globlib
import gzip
import io
import json
import lzma
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from .validate import DataError, Location

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")  # of text formats (jsonl, json, csv)
# a JSON \u escape of a UTF-16 surrogate: valid in pairs (characters outside the BMP), not alone
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
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


def data_kind(path: Path) -> str | None:
    """"jsonl" | "json" | "csv" | "parquet" for a data file name (compressed text formats included), else None."""
    suffix = path.suffix.lower()
    if suffix in COMPRESSED:
        kind = EXTENSIONS.get(Path(path.stem).suffix.lower())
        return kind if kind != "parquet" else None
    return EXTENSIONS.get(suffix)


def open_data(path: Path):
    """The file's bytes, decompressed if its name says so."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".xz":
        return lzma.open(path, "rb")
    if suffix == ".zst":
        return io.BufferedReader(_ZstdReader(path))
    return open(path, "rb")


class _ZstdReader(io.RawIOBase):
    """Zstandard frames decompressed as a stream; a stream that ends inside a frame is an error (zstandard's own
    stream reader ends quietly there, which would lose the rest of the file without a word)."""

    def __init__(self, path: Path):
        import zstandard

        self._file, self._new = open(path, "rb"), zstandard.ZstdDecompressor().decompressobj
        self._obj, self._buf, self._in_frame = self._new(), b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            chunk = self._file.read(1 << 16)
            if not chunk:
                if self._in_frame:
                    raise EOFError("compressed stream ends inside a zstd frame (truncated file)")
                return 0
            while chunk:
                self._in_frame = True
                self._buf += self._obj.decompress(chunk)
                chunk = self._obj.unused_data if self._obj.eof else b""
                if self._obj.eof:
                    self._obj, self._in_frame = self._new(), False
        n = min(len(b), len(self._buf))
        b[:n], self._buf = self._buf[:n], self._buf[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def expand_paths(inputs: list[str | Path]) -> list[Path]:
    """Files (and saved datasets) named by the inputs: files, directories (recursive) or glob patterns."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if _is_hf_dataset(p):
            out.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and data_kind(f)
                           and not _inside_hf_dataset(f, p))
            found += sorted(d for d in p.rglob("*") if _is_hf_dataset(d) and not _inside_hf_dataset(d, p))
            if not found:
                raise FileNotFoundError(f"{p}: directory has no .jsonl/.json/.csv/.parquet files")
            out.extend(found)
        elif p.is_file():
            if data_kind(p) is None:
                raise ValueError(f"{p}: unsupported file type {''.join(p.suffixes[-2:])!r} (use .jsonl, .json, .csv "
                                 f"or .parquet; text formats may be compressed: .gz, .bz2, .xz, .zst)")
            out.append(p)
        elif p.is_symlink():
            raise FileNotFoundError(f"{item}: a symbolic link that points nowhere (broken, or a loop)")
        elif any(c in str(item) for c in "*?["):
            found = sorted(Path(f) for f in globlib.glob(str(item), recursive=True)
                           if (Path(f).is_file() and data_kind(Path(f)) and not _inside_hf_dataset(Path(f)))
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


def _parse_json(text: str, where: Location):
    """json.loads with the two ways valid-looking JSON is not data: nesting past Python's recursion limit, and
    lone surrogate escapes (not characters; no tokenizer can take them)."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise DataError(where, "invalid_json", "nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(obj):
        raise DataError(where, "non_utf8", "a string holds a lone UTF-16 surrogate escape (e.g. \\ud800), which is "
                        "not a Unicode character")
    return obj


def _has_lone_surrogate(obj) -> bool:
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if any("\ud800" <= ch <= "\udfff" for ch in x):
                return True
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return False


def read_jsonl(path: Path) -> Iterator[tuple[Location, dict | DataError]]:
    with open_data(path) as f:
        for lineno, raw in enumerate(f, start=1):
            where = Location(str(path), line=lineno)
            if lineno == 1 and raw.startswith(BOM):
                yield where, DataError(where, "bom", "save the file as UTF-8 without BOM")
                continue
            if not raw.strip():
                continue
            try:
                obj = _parse_json(_decode_utf8(raw, where), where)
            except DataError as e:
                yield where, e
                continue
            except json.JSONDecodeError as e:
                yield where, DataError(where, "invalid_json", f"{e.msg} at column {e.colno}")
                continue
            yield where, obj


def read_json(path: Path) -> Iterator[tuple[Location, dict | DataError]]:
    with open_data(path) as f:
        raw = f.read()
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
    except RecursionError:
        yield file_where, DataError(file_where, "invalid_json", "nested too deeply")
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        yield file_where, DataError(file_where, "wrong_type", "a .json file must hold an array of records")
        return
    check = bool(_SURROGATE_ESCAPE.search(text))
    for i, obj in enumerate(data):
        where = Location(str(path), index=i)
        if check and _has_lone_surrogate(obj):
            yield where, DataError(where, "non_utf8", "a string holds a lone UTF-16 surrogate escape (e.g. "
                                   "\\ud800), which is not a Unicode character")
            continue
        yield where, obj


def read_csv(path: Path) -> Iterator[tuple[Location, dict | DataError]]:
    with open_data(path) as fb:
        if fb.read(3) == BOM:
            where = Location(str(path), line=1)
            yield where, DataError(where, "bom", "save the file as UTF-8 without BOM")
            return
    with io.TextIOWrapper(open_data(path), encoding="utf-8", errors="surrogateescape", newline="") as f:
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
    """The file's records; a file that cannot be read (corrupt, truncated archive, gone) ends in one
    `unreadable_file` error naming it, after the records read before the failure."""
    reader = read_hf_dataset if _is_hf_dataset(path) else READERS[data_kind(path)]
    try:
        yield from reader(path)
    except DataError:
        raise
    except Exception as e:  # pyarrow, decompressors and the OS raise their own types; name the file
        where = Location(str(path))
        yield where, DataError(where, "unreadable_file", f"{type(e).__name__}: {e}")


def count_records(path: Path) -> int | None:
    """Cheap record count for progress bars (None where it would cost a parse)."""
    if _is_hf_dataset(path):
        return None
    kind = data_kind(path)
    try:
        if kind == "jsonl":
            n = 0
            with open_data(path) as f:
                for raw in f:
                    n += bool(raw.strip())
            return n
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # unreadable: the reader names the file and the reason
        return None
    return None
