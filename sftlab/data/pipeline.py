"""The data path as one chain: load -> normalise -> (dedup) -> render -> tokenize+mask.

`iter_conversations` and `iter_examples` stream: records are read, converted and tokenized in small
batches and never held twice. Invalid records raise `DataError` (file, line, reason) unless
`skip_invalid`, in which case they are counted per reason in `DataReport.invalid`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DataConfig
from ..io import progress
from .formats import Conversation, detect_format, to_conversation
from .load import count_records, expand_paths, read_records
from .template import REASONING_CLOSE, ChatTemplate, TemplateError, render_conversation, render_turn, resolve_template
from .tokenize import Dropped, Example, Resplit, protected_pattern, tokenize_rendered
from .validate import DataError, InvalidLog, Location


@dataclass
class DataReport:
    """What happened to the input: counts a user needs to trust the data."""

    records: int = 0
    kept: int = 0
    formats: Counter = field(default_factory=Counter)
    tasks: Counter = field(default_factory=Counter)
    duplicates: int = 0
    duplicates_dropped: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)  # truncation policy drops, by reason
    invalid: InvalidLog = field(default_factory=InvalidLog)
    special_text: Counter = field(default_factory=Counter)  # control-token strings found in data text
    first_duplicates: list[str] = field(default_factory=list)
    # conversations that became several examples (the template rewrites history): the extra examples, and the
    # tokens they cost beyond the longest example of each such conversation
    reasoning_turns: int = 0  # assistant turns with a reasoning trace (field or <think> block)
    tool_call_turns: int = 0  # assistant turns that call tools
    split_conversations: int = 0
    extra_examples: int = 0
    extra_tokens: int = 0

    def as_dict(self) -> dict:
        return {
            "records": self.records, "kept": self.kept, "formats": dict(self.formats), "tasks": dict(self.tasks),
            "duplicates": self.duplicates, "duplicates_dropped": self.duplicates_dropped,
            "truncated": self.truncated, "dropped": dict(self.dropped),
            "invalid": {"total": self.invalid.total, "by_reason": dict(self.invalid.counts),
                        "first": self.invalid.examples},
            "special_token_text": dict(self.special_text),
            "reasoning_turns": self.reasoning_turns, "tool_call_turns": self.tool_call_turns,
            "history_rewrites": {"conversations": self.split_conversations, "extra_examples": self.extra_examples,
                                 "extra_tokens": self.extra_tokens},
        }

    def count_split(self, lengths: list[int]) -> None:
        """One conversation trained as `len(lengths)` examples of these lengths."""
        if len(lengths) > 1:
            self.split_conversations += 1
            self.extra_examples += len(lengths) - 1
            self.extra_tokens += sum(lengths) - max(lengths)


def load_tools(path: str | None) -> list | None:
    """`data.tools`: a JSON file holding a list of tool schemas (objects)."""
    if not path:
        return None
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(Location(str(path)), "invalid_json", f"data.tools: {e}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(Location(str(path)), "wrong_type", "data.tools must hold a list of tool schemas (objects)")
    return tools


def load_task_map(path: str | None) -> dict[str, str]:
    if not path:
        return {}
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: task map must be a JSON object of file stem -> task")
    out = {}
    for stem, v in data.items():
        if isinstance(v, str):
            out[stem] = v
        elif isinstance(v, dict) and isinstance(v.get("task"), str):
            out[stem] = v["task"]
        else:
            raise ValueError(f"{path}: entry {stem!r} must be a task name or an object with a 'task' string")
    return out


def _file_task(path: Path, task_map: dict[str, str]) -> str:
    """The task of a file's records when no task field names it: its stem (a dataset directory's name), mapped."""
    stem = path.stem if path.is_file() else path.name
    return task_map.get(stem, stem)


def _task_of(rec: dict, file_task: str, opts: DataConfig, where: Location) -> str | None:
    if opts.task_field:
        v = rec.get(opts.task_field)
        if v is None:
            raise DataError(where, "missing_field", f"task field {opts.task_field!r}")
        return str(v)
    return file_task


def _handle(err: DataError, opts: DataConfig, report: DataReport) -> None:
    if not opts.skip_invalid:
        raise err
    report.invalid.add(err)


def total_records(inputs: list[str | Path]) -> int | None:
    counts = [count_records(p) for p in expand_paths(inputs)]
    return None if any(c is None for c in counts) else sum(counts)


@contextmanager
def record_progress(inputs, console, label: str):
    """A progress bar over the input records; yields the per-record callback."""
    with progress(label, console, unit="records") as p:
        task = p.add_task(label, total=total_records(inputs))
        yield lambda: p.advance(task)


def iter_conversations(inputs: list[str | Path], opts: DataConfig, report: DataReport | None = None,
                       special: Callable[[str], list[str]] | None = None,
                       on_record: Callable[[], None] | None = None) -> Iterator[Conversation]:
    """Valid, normalised conversations in input order (duplicates counted, dropped with `dedup`)."""
    report = report if report is not None else DataReport()
    task_map = load_task_map(opts.task_map)
    seen: set[bytes] = set()
    file_tools = load_tools(opts.tools)
    for path in expand_paths(inputs):
        file_format = opts.format
        file_task = _file_task(path, task_map)
        records = 0
        for where, rec in read_records(path):
            records += 1
            report.records += 1
            if on_record:
                on_record()
            try:
                if isinstance(rec, DataError):
                    raise rec
                if not isinstance(rec, dict):
                    raise DataError(where, "not_object", f"got {type(rec).__name__}")
                fmt = opts.format or detect_format(rec)
                if fmt is None:
                    raise DataError(where, "unknown_format", f"fields {sorted(rec)[:8]}; expected alpaca "
                                    "(instruction/output), prompt/completion, messages or conversations")
                if file_format is None:
                    file_format = fmt
                elif fmt != file_format:
                    raise DataError(where, "mixed_formats", f"{fmt} record in a {file_format} file")
                task = _task_of(rec, file_task, opts, where)
                conv = to_conversation(rec, where, fmt, task, opts.strip)
                if conv.tools is None:
                    conv.tools = file_tools
            except DataError as e:
                _handle(e, opts, report)
                continue
            key = hashlib.blake2b(repr(conv.key()).encode(), digest_size=16).digest()
            if key in seen:
                report.duplicates += 1
                if len(report.first_duplicates) < 5:
                    report.first_duplicates.append(str(where))
                if opts.dedup:
                    report.duplicates_dropped += 1
                    continue
            seen.add(key)
            if special is not None:
                for m in conv.messages:
                    for s in special(m.content):
                        report.special_text[s] += 1
            report.formats[fmt] += 1
            for m in conv.messages:
                report.reasoning_turns += m.reasoning is not None or (m.role == "assistant" and REASONING_CLOSE in m.content)
                report.tool_call_turns += bool(m.tool_calls)
            report.tasks[task] += 1
            yield conv
        if records == 0:
            _handle(DataError(Location(str(path)), "empty_file", "no records (empty, or only blank lines)"), opts,
                    report)


def encode_conversations(convs: Iterable[Conversation], tokenizer, tmpl: ChatTemplate, opts: DataConfig,
                         protected=None, batch_size: int = 256
                         ) -> Iterator[tuple[Conversation, Example | DataError | Dropped]]:
    """render -> tokenize+mask, in batches: one result per example, in order (a conversation whose template
    rewrites history gives several, `render_conversation`), a failure in place of its examples (a template error
    becomes a `DataError` naming the record). The one chain every consumer uses:
    training data, the audit, evaluation items and prompts built in code (few-shot, QA probes)."""
    protected = protected if protected is not None else protected_pattern(tokenizer)
    batch: list[Conversation] = []

    def flush():
        out = encode_batch(batch, tokenizer, tmpl, opts, protected)
        batch.clear()
        return out

    for conv in convs:
        batch.append(conv)
        if len(batch) >= batch_size:
            yield from flush()
    if batch:
        yield from flush()


def encode_batch(batch: list[Conversation], tokenizer, tmpl: ChatTemplate, opts: DataConfig, protected
                  ) -> list[tuple[Conversation, Example | DataError | Dropped]]:
    """`encode_conversations` for one batch: render each conversation (one or more examples), tokenize them all,
    and give a turn whose context tokenizes differently inside a shared example an example of its own."""
    rendered, owners, results = [], [], {}
    for k, conv in enumerate(batch):
        try:
            parts = render_conversation(conv, tmpl, opts.loss_on, opts.train_reasoning)
        except TemplateError as e:
            results[k] = [DataError(conv.where, "template", str(e)) if conv.where else e]
            continue
        rendered += parts
        owners += [k] * len(parts)
    encoded = tokenize_rendered(rendered, [batch[k] for k in owners], tokenizer, opts, protected)
    alone, alone_owners = [], []
    for k, res in zip(owners, encoded):
        if isinstance(res, Resplit):
            alone += [render_turn(batch[k], tmpl, turn, opts.train_reasoning) for turn in res.turns]
            alone_owners += [k] * len(res.turns)
            res = res.example
        results.setdefault(k, []).append(res)
    for k, res in zip(alone_owners, tokenize_rendered(alone, [batch[k] for k in alone_owners], tokenizer, opts,
                                                      protected)):
        results[k].append(res)
    return [(conv, res) for k, conv in enumerate(batch) for res in results[k]]


def keep_examples(results: Iterable[tuple[Conversation, Example | DataError | Dropped]], skip_invalid: bool,
                  report: DataReport) -> Iterator[tuple[Conversation, Example]]:
    """The examples of `encode_conversations` that training sees: truncation-policy drops counted per reason,
    an invalid record raised (or, with `skip_invalid`, counted), kept examples and truncations counted. A chat
    template that fails every record is an error even with `skip_invalid` (the template is wrong, not the data)."""
    kept, first_template_error, template_errors = 0, None, 0
    current, lengths = None, []
    for conv, res in results:
        if conv is not current:
            report.count_split(lengths)
            current, lengths = conv, []
        if isinstance(res, Dropped):
            report.dropped[res.reason] += 1
        elif isinstance(res, Exception):
            if not skip_invalid or not isinstance(res, DataError):
                raise res
            if res.reason == "template":
                template_errors += 1
                first_template_error = first_template_error or res
            report.invalid.add(res)
        else:
            report.truncated += res.truncated
            report.kept += 1
            kept += 1
            lengths.append(len(res.input_ids))
            yield conv, res
    report.count_split(lengths)
    if kept == 0 and template_errors:
        raise TemplateError(f"the chat template fails every record ({template_errors}), so it is the template "
                            f"that is wrong for this data; the first: {first_template_error}")


def iter_examples(inputs: list[str | Path], tokenizer, opts: DataConfig, report: DataReport | None = None,
                  batch_size: int = 256, on_record: Callable[[], None] | None = None,
                  with_conversation: bool = False) -> Iterator[Example]:
    """Tokenized training examples in input order (truncation-policy drops and invalid records counted)."""
    report = report if report is not None else DataReport()
    tmpl = resolve_template(opts.template, tokenizer)
    protected = protected_pattern(tokenizer)
    convs = iter_conversations(inputs, opts, report, protected.findall, on_record)
    encoded = encode_conversations(convs, tokenizer, tmpl, opts, protected, batch_size)
    for conv, ex in keep_examples(encoded, opts.skip_invalid, report):
        yield (ex, conv) if with_conversation else ex
