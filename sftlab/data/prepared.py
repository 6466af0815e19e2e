"""Prepared data: the tokenized examples of a data set, built once, kept on disk, memory-mapped by every reader.

`prepare(inputs, tokenizer, opts)` returns a `Prepared` (a read-only sequence of `Example`s) from the cache entry
keyed by everything that changes the tokens (`cache_key`): the content (sha256) of every input file and of the
files options name (task map, tools), the tokenizer (its whole serialised definition), the chat template and its
context, every data option that is applied before batching, and the source of the data code itself. A changed file,
tokenizer, template, option or sftlab data code is another key; nothing is ever matched by name or time.

An entry is a directory `<cache_dir>/<key>/`:
- `input_ids.bin` (uint16 where the vocabulary allows, else int32) and `mask.bin` (uint8: 1 where the token is
  trained; labels are the ids there and -100 elsewhere, the one form `tokenize.build_example` gives), both flat;
  `weights.bin` (float32, flat) only with `prompt_loss_weight > 0`;
- `offsets.npy` (int64, examples + 1), `task_ids.npy` (int32) and `truncated.npy` (uint8), one per example;
- `digests.bin`: each example's `example_digest` (DIGEST bytes), what the run's data fingerprint is made of (read
  without touching the token arrays, so training's memory does not grow with the data set);
- `meta.json`: the key's components, counts, dtypes, the data report, the answer counts `data inspect` needs —
  written last, then the directory is renamed into place. A directory without a complete `meta.json`, or whose
  arrays do not have the sizes it records, is never used (a build that died is rebuilt).

Building streams with bounded memory: the main process reads and normalises records (`iter_conversations`: the
duplicate check needs one place that sees them all) and writes arrays in input order; rendering and tokenizing,
most of the cost, run in `num_workers` processes on batches of conversations, a bounded number of batches in flight.
With one worker everything runs in this process. The examples, their order and the report are the same for any
worker count (tested). Under several training processes, rank 0 builds and the others map the result
(`train.loop.prepare_data`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DataConfig
from .answers import normalise_answer
from .formats import Conversation
from .load import expand_paths
from .pipeline import DataReport, encode_batch, keep_examples, record_progress
from .template import ChatTemplate, resolve_template
from .tokenize import IGNORE, Dropped, Example, protected_pattern
from .validate import DataError, InvalidLog, Location

FORMAT = 2  # the entry layout; a change is a new key
DIGEST = 16  # bytes of each example's digest (`example_digest`)
# options applied after the cache (batching, the validation split) or that do not change tokens
# (skip_invalid: an entry holds the valid examples either way and records its invalid ones; a run without it gets
# the first one's error from a hit, `invalid_error`)
NOT_IN_KEY = ("train", "validation", "validation_fraction", "cache", "cache_dir", "num_workers", "skip_invalid")
DATA_CODE = ("load.py", "formats.py", "template.py", "tokenize.py", "pipeline.py", "validate.py", "prepared.py",
             "answers.py")
MAX_LABELS = 20  # `answers.answer_distribution`: a task with more distinct normalised answers has none
RAW_ANSWERS = 64 * MAX_LABELS  # distinct raw answers counted per task before it is taken as free text
BATCH = 256  # conversations per worker batch


def cache_root(opts: DataConfig) -> Path:
    """`data.cache_dir`, else $SFTLAB_DATA_CACHE, else the sftlab cache's `data/` ($SFTLAB_CACHE, ~/.cache/sftlab)."""
    if opts.cache_dir:
        return Path(opts.cache_dir)
    if os.environ.get("SFTLAB_DATA_CACHE"):
        return Path(os.environ["SFTLAB_DATA_CACHE"])
    from ..models import cache_dir

    return cache_dir() / "data"


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _input_files(path: Path) -> list[Path]:
    """The files whose bytes make up one expanded input (a saved dataset is a directory of files)."""
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's whole definition: the serialised fast tokenizer (vocabulary, merges, normaliser,
    pre-tokeniser, added tokens) or, for a slow one, its vocabulary and added tokens; plus its class."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    h.update(json.dumps(sorted(tokenizer.get_added_vocab().items()), ensure_ascii=False).encode())
    return h.hexdigest()


def cache_key(inputs: list[str | Path], tokenizer, tmpl: ChatTemplate, opts: DataConfig) -> tuple[str, dict]:
    """The entry's key (sha256 hex) and the components it hashes (kept in meta.json)."""
    files = [{"path": str(f), "sha256": _file_sha256(f), "bytes": f.stat().st_size}
             for p in expand_paths(inputs) for f in _input_files(p)]
    options = opts.model_dump(mode="json", exclude=set(NOT_IN_KEY))
    named = {k: _file_sha256(Path(v)) for k in ("task_map", "tools") if (v := getattr(opts, k)) and Path(v).is_file()}
    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / n).read_bytes() for n in DATA_CODE)).hexdigest()
    template = hashlib.sha256((tmpl.source + json.dumps(tmpl.context, sort_keys=True, default=str)).encode())
    components = {"format": FORMAT, "inputs": [{"sha256": f["sha256"], "bytes": f["bytes"]} for f in files],
                  "tokenizer": tokenizer_fingerprint(tokenizer), "template": template.hexdigest(),
                  "options": options, "option_files": named, "code": code}
    key = hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()[:32]
    return key, {**components, "input_files": [f["path"] for f in files]}


# ---------------------------------------------------------------------------------------------- reading
class Prepared(Sequence):
    """The examples of a cache entry (or a subset of them, `select`), read from memory-mapped arrays: indexing
    builds one `Example`; `lengths` and `tasks` come without touching the token arrays."""

    def __init__(self, path: Path, index: np.ndarray | None = None, meta: dict | None = None):
        self.path = Path(path)
        self.meta = meta if meta is not None else json.loads((self.path / "meta.json").read_text())
        m = self.meta
        self._ids = _memmap(self.path / "input_ids.bin", m["ids_dtype"], m["tokens"])
        self._mask = _memmap(self.path / "mask.bin", "uint8", m["tokens"])
        self._weights = _memmap(self.path / "weights.bin", "float32", m["tokens"]) if m["weights"] else None
        self._offsets = np.load(self.path / "offsets.npy", mmap_mode="r")
        self._task_ids = np.load(self.path / "task_ids.npy", mmap_mode="r")
        self._truncated = np.load(self.path / "truncated.npy", mmap_mode="r")
        self._digests = _memmap(self.path / "digests.bin", "uint8", m["examples"] * DIGEST).reshape(-1, DIGEST)
        self.task_names: list[str | None] = m["tasks"]
        self.index = index

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else self.meta["examples"]

    def _row(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        i = i % n
        return int(self.index[i]) if self.index is not None else i

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.select(np.arange(len(self))[i])
        r = self._row(i)
        ids, labels = self._arrays(r)
        weights = self._weights[self._offsets[r]:self._offsets[r + 1]].tolist() if self._weights is not None else None
        return Example(ids.tolist(), labels.tolist(), weights, self.task_names[self._task_ids[r]],
                       bool(self._truncated[r]))

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Example i's input ids and labels as int64 arrays (no Python lists)."""
        return self._arrays(self._row(i))

    def _arrays(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self._offsets[r]), int(self._offsets[r + 1])
        ids = self._ids[a:b].astype(np.int64)
        return ids, np.where(self._mask[a:b].astype(bool), ids, IGNORE)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example (int64), in this sequence's order."""
        lengths = np.diff(self._offsets)
        return lengths[self.index] if self.index is not None else lengths

    def tasks(self) -> set:
        """The distinct tasks of these examples."""
        ids = np.unique(self._task_ids[self.index] if self.index is not None else self._task_ids)
        return {self.task_names[i] for i in ids}

    def digests(self, chunk: int = 65536) -> Iterator[bytes]:
        """`example_digest` of each example, in this sequence's order, a chunk of examples at a time; the whole
        entry's are read from the file (no pages mapped), a subset's gathered from the map."""
        if self.index is None:
            with open(self.path / "digests.bin", "rb") as f:
                while block := f.read(chunk * DIGEST):
                    yield block
            return
        for a in range(0, len(self.index), chunk):
            yield self._digests[self.index[a:a + chunk]].tobytes()

    def select(self, index) -> Prepared:
        """The examples at `index` (positions in this sequence), as another `Prepared` over the same arrays."""
        index = np.asarray(index, dtype=np.int64)
        rows = self.index[index] if self.index is not None else index
        return Prepared(self.path, rows, self.meta)

    def report(self) -> DataReport:
        report = report_from_dict(self.meta["report"])
        report.invalid.first = invalid_error(self.meta)
        return report


def _memmap(path: Path, dtype: str, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


Examples = Sequence  # of `Example`: a list, or a `Prepared` (what training takes)


def prepared_line(built: Built, label: str = "data") -> str:
    """The one-line summary of `prepare`: a cache hit (nothing tokenized) or a build, with its rate."""
    p, m = built.prepared, built.prepared.meta
    what = f"{label}: {len(p):,} examples, {m['tokens']:,} tokens"
    if built.hit:
        return f"{what} from the prepared-data cache in {built.seconds:.1f} s (nothing tokenized): {p.path}"
    rate = m["report"]["records"] / max(m["build_seconds"], 1e-9)
    return (f"{what} prepared in {built.seconds:.1f} s ({rate:,.0f} records/s, {m['num_workers']} worker"
            f"{'s' if m['num_workers'] > 1 else ''}) and cached: {p.path}")


def lengths_of(examples) -> list[int]:
    """Tokens per example of a list of examples or a `Prepared`."""
    if isinstance(examples, Prepared):
        return examples.lengths.tolist()
    return [len(ex.input_ids) for ex in examples]


def trained_counts(p: Prepared, chunk: int = 65536) -> np.ndarray:
    """Trained tokens per example (with prompt_loss_weight: tokens of full weight), in this sequence's order: one
    pass over the entry's mask in chunks of examples, so memory stays bounded."""
    flags = p._mask if p._weights is None else p._weights
    offsets = np.asarray(p._offsets)
    n = len(offsets) - 1
    per = np.zeros(n, dtype=np.int64)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        lo, hi = int(offsets[a]), int(offsets[b])
        part = (np.asarray(flags[lo:hi]) == 1).astype(np.int32)
        starts = offsets[a:b] - lo
        if hi > lo:
            per[a:b] = np.add.reduceat(part, starts)
        per[a:b][offsets[a + 1:b + 1] == offsets[a:b]] = 0  # reduceat gives an empty segment its next element
    return per[p.index] if p.index is not None else per


def tasks_of(examples) -> set:
    if isinstance(examples, Prepared):
        return examples.tasks()
    return {ex.task for ex in examples}


def example_digest(input_ids, labels) -> bytes:
    """One example's digest (DIGEST bytes of blake2b over its ids and labels as int64): what the data fingerprint is
    made of; an entry stores them, so a fingerprint never reads the token arrays."""
    h = hashlib.blake2b(np.asarray(input_ids, dtype=np.int64).tobytes(), digest_size=DIGEST)
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.digest()


def fingerprint(examples: Sequence) -> str:
    """sha256 over the examples' digests in order: the same data, tokenized the same way, gives the same value, from
    a list of examples or from the cache (its stored digests; memory bounded for any size)."""
    h = hashlib.sha256()
    for block in _digest_blocks(examples):
        h.update(block)
    return h.hexdigest()


def _digest_blocks(examples: Sequence) -> Iterator[bytes]:
    if isinstance(examples, Prepared):
        yield from examples.digests()
    elif isinstance(examples, Chained):
        yield from _digest_blocks(examples.first)
        yield from _digest_blocks(examples.second)
    else:
        for ex in examples:
            yield example_digest(ex.input_ids, ex.labels)


class Chained(Sequence):
    """Two example sequences as one (index len(first) + j is second[j]), without copying either."""

    def __init__(self, first: Sequence, second: Sequence):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, i: int):
        n = len(self.first)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.first[i] if i < n else self.second[i - n]


def report_from_dict(d: dict) -> DataReport:
    """The `DataReport` a build saved (`DataReport.as_dict`)."""
    h = d["history_rewrites"]
    return DataReport(records=d["records"], kept=d["kept"], formats=Counter(d["formats"]), tasks=Counter(d["tasks"]),
                      duplicates=d["duplicates"], duplicates_dropped=d["duplicates_dropped"],
                      truncated=d["truncated"], dropped=Counter(d["dropped"]),
                      invalid=InvalidLog(Counter(d["invalid"]["by_reason"]), list(d["invalid"]["first"])),
                      special_text=Counter(d["special_token_text"]), reasoning_turns=d["reasoning_turns"],
                      tool_call_turns=d["tool_call_turns"], split_conversations=h["conversations"],
                      extra_examples=h["extra_examples"], extra_tokens=h["extra_tokens"])


def invalid_error(meta: dict) -> DataError | None:
    """The first invalid record of an entry built with `skip_invalid`: the error a run without it stops with."""
    f = meta.get("first_invalid")
    return DataError(Location(f["file"], f["line"], f["index"]), f["reason"], f["detail"]) if f else None


def open_entry(path: Path) -> Prepared | None:
    """The entry at `path` if it is complete (meta.json written last, arrays of the recorded sizes), else None."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if not meta.get("complete"):
            return None
        width = np.dtype(meta["ids_dtype"]).itemsize
        sizes = {"input_ids.bin": meta["tokens"] * width, "mask.bin": meta["tokens"],
                 "digests.bin": meta["examples"] * DIGEST}
        if meta["weights"]:
            sizes["weights.bin"] = meta["tokens"] * 4
        if any(n and (path / f).stat().st_size != n for f, n in sizes.items()):
            return None
        prepared = Prepared(path, meta=meta)
        if len(prepared._offsets) != meta["examples"] + 1 or int(prepared._offsets[-1]) != meta["tokens"]:
            return None
        return prepared
    except (OSError, ValueError, KeyError):
        return None


# ---------------------------------------------------------------------------------------------- building
@dataclass
class Built:
    prepared: Prepared
    hit: bool  # found in the cache (nothing tokenized)
    seconds: float


def prepare(inputs: list[str | Path], tokenizer, opts: DataConfig, console=None, *, label: str = "prepare",
            root: Path | None = None) -> Built:
    """The prepared examples of `inputs`: from the cache, or built (with a progress bar) and cached."""
    t0 = time.perf_counter()
    tmpl = resolve_template(opts.template, tokenizer)
    key, components = cache_key(inputs, tokenizer, tmpl, opts)
    root = Path(root) if root is not None else cache_root(opts)
    entry = root / key
    found = open_entry(entry)
    if found is not None:
        if not opts.skip_invalid and (err := invalid_error(found.meta)):
            raise err
        return Built(found, True, time.perf_counter() - t0)
    if entry.exists():  # incomplete or damaged: never used
        shutil.rmtree(entry, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with record_progress(inputs, console, label) as tick:
            _build(tmp, inputs, tokenizer, tmpl, opts, components, tick)
        try:
            os.rename(tmp, entry)
        except OSError:  # another process finished the same key first: use its entry
            if open_entry(entry) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Built(Prepared(entry), False, time.perf_counter() - t0)


class _Writer:
    """Appends examples to the entry's flat arrays in input order."""

    def __init__(self, out: Path, ids_dtype: str, weights: bool):
        out.mkdir(parents=True)
        self.out, self.ids_dtype = out, np.dtype(ids_dtype)
        self.ids = open(out / "input_ids.bin", "wb")
        self.mask = open(out / "mask.bin", "wb")
        self.weights = open(out / "weights.bin", "wb") if weights else None
        self.digests = open(out / "digests.bin", "wb")
        self.lengths: list[int] = []
        self.task_ids: list[int] = []
        self.truncated: list[int] = []
        self.tasks: dict = {}
        self.answers: dict = {}  # task -> Counter of raw last answers (None once past RAW_ANSWERS distinct)
        self.refs: Counter = Counter()  # task -> references seen

    def add(self, ex: Example, answer: str | None) -> None:
        ids = np.asarray(ex.input_ids)
        labels = np.asarray(ex.labels)
        trained = labels != IGNORE
        if not np.array_equal(labels[trained], ids[trained]):  # the one label form the entry stores
            raise AssertionError("labels differ from input ids at trained positions")
        self.ids.write(ids.astype(self.ids_dtype).tobytes())
        self.mask.write(trained.astype(np.uint8).tobytes())
        self.digests.write(example_digest(ids, labels))
        if self.weights is not None:
            self.weights.write(np.asarray(ex.weights, dtype=np.float32).tobytes())
        self.lengths.append(len(ids))
        self.task_ids.append(self.tasks.setdefault(ex.task, len(self.tasks)))
        self.truncated.append(ex.truncated)
        if answer is not None:
            task = str(ex.task)
            self.refs[task] += 1
            counts = self.answers.setdefault(task, Counter())
            if counts is not None:
                counts[answer] += 1
                if len(counts) > RAW_ANSWERS:
                    self.answers[task] = None

    def close(self, meta: dict) -> None:
        for f in (self.ids, self.mask, self.weights, self.digests):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        np.save(self.out / "offsets.npy", offsets)
        np.save(self.out / "task_ids.npy", np.asarray(self.task_ids, dtype=np.int32))
        np.save(self.out / "truncated.npy", np.asarray(self.truncated, dtype=np.uint8))
        meta.update(examples=len(self.lengths), tokens=int(offsets[-1]), ids_dtype=self.ids_dtype.name,
                    weights=self.weights is not None, tasks=list(self.tasks),
                    answers={t: {"n": self.refs[t], "counts": _normalised(c)} for t, c in self.answers.items()},
                    complete=True)
        with open(self.out / "meta.json", "w", encoding="utf-8") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())


def _normalised(raw: Counter | None) -> dict | None:
    """Counts of the non-empty normalised answers (each distinct raw answer normalised once); None for a task
    whose answers are free text (more than MAX_LABELS distinct, or more raw variants than RAW_ANSWERS)."""
    if raw is None:
        return None
    counts: Counter = Counter()
    for text, k in raw.items():
        if norm := normalise_answer(text):
            counts[norm] += k
    return dict(counts) if len(counts) <= MAX_LABELS else None


def last_answer(conv: Conversation) -> str | None:
    """The reference `data inspect` reads an answer distribution from: the last assistant message."""
    for m in reversed(conv.messages):
        if m.role == "assistant":
            return m.content
    return None


def _build(out: Path, inputs, tokenizer, tmpl: ChatTemplate, opts: DataConfig, components: dict,
           on_record: Callable[[], None]) -> None:
    from .pipeline import iter_conversations

    report = DataReport()
    protected = protected_pattern(tokenizer)
    ids_dtype = "uint16" if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else "int32"
    writer = _Writer(out, ids_dtype, opts.prompt_loss_weight > 0 and opts.loss_on != "all")
    t0 = time.perf_counter()
    convs = iter_conversations(inputs, opts, report, protected.findall, on_record)
    results = _encoded(convs, tokenizer, tmpl, opts, protected, opts.num_workers)
    for conv, ex in keep_examples(results, opts.skip_invalid, report):
        writer.add(ex, last_answer(conv))
    first = report.invalid.first
    writer.close({**components, "report": report.as_dict(), "build_seconds": time.perf_counter() - t0,
                  "num_workers": opts.num_workers,
                  "first_invalid": first and {"file": first.where.file, "line": first.where.line,
                                              "index": first.where.index, "reason": first.reason,
                                              "detail": first.detail}})


def _encoded(convs: Iterator[Conversation], tokenizer, tmpl: ChatTemplate, opts: DataConfig, protected,
             workers: int) -> Iterator[tuple[Conversation, Example | DataError | Dropped]]:
    """`pipeline.encode_conversations`' results in input order, rendered and tokenized by `workers` processes."""
    from collections import deque
    from multiprocessing import get_context

    def batches():
        batch = []
        for conv in convs:
            batch.append(conv)
            if len(batch) == BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    if workers <= 1:
        for batch in batches():
            yield from encode_batch(batch, tokenizer, tmpl, opts, protected)
        return
    pending: deque = deque()
    # fork where it is the platform's way (Linux; as torch's DataLoader and datasets' num_proc): no re-import of
    # the caller's main module, nothing pickled to start; spawn elsewhere
    context = get_context("fork" if sys.platform == "linux" else "spawn")
    with _tokenizers_serial(), ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                                   initargs=(tokenizer, tmpl, opts)) as pool:
        for batch in batches():
            pending.append((batch, pool.submit(_worker_encode, batch)))
            while len(pending) > 2 * workers:  # bounded: a few batches per worker in flight
                yield from _joined(*pending.popleft())
        while pending:
            yield from _joined(*pending.popleft())


@contextmanager
def _tokenizers_serial():
    """TOKENIZERS_PARALLELISM=false while worker processes start (one process per core already; and a fork after
    the Rust thread pool ran would otherwise warn and switch it off itself)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _joined(batch: list[Conversation], future) -> Iterator[tuple[Conversation, object]]:
    for k, res in future.result():
        yield batch[k], res


_WORKER: dict = {}


def _worker_init(tokenizer, tmpl: ChatTemplate, opts: DataConfig) -> None:
    _WORKER.update(tokenizer=tokenizer, tmpl=tmpl, opts=opts, protected=protected_pattern(tokenizer))


def _worker_encode(batch: list[Conversation]) -> list[tuple[int, object]]:
    """A batch's results by position in the batch (the conversations stay with the main process), token lists as
    compact arrays for the trip back."""
    w = _WORKER
    where = {id(conv): k for k, conv in enumerate(batch)}
    out = []
    for conv, res in encode_batch(batch, w["tokenizer"], w["tmpl"], w["opts"], w["protected"]):
        if isinstance(res, Example):
            res = Example(np.asarray(res.input_ids, dtype=np.int32), np.asarray(res.labels, dtype=np.int32),
                          None if res.weights is None else np.asarray(res.weights, dtype=np.float32), res.task,
                          res.truncated)
        out.append((where[id(conv)], res))
    return out


def prepare_command(inputs, model: str, opts: DataConfig, console) -> Built:
    """`sftlab data prepare`: build (or find) the entry and say how training finds it."""
    from ..models import load_tokenizer

    built = prepare(inputs, load_tokenizer(model), opts, console)
    console.print(f"[green]done[/] {prepared_line(built)}", highlight=False, soft_wrap=True)
    hint = f" data.cache_dir={cache_root(opts)}" if opts.cache_dir else ""
    console.print(f"sftlab train (and data inspect) with the same model, data and data options{hint} read it "
                  "without tokenizing", highlight=False, soft_wrap=True)
    return built
