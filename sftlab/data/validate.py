"""Errors for bad input records: every one names the file, the line (or record index) and the reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# Reasons a record is invalid; the keys are what `--skip-invalid` counts.
REASONS = {
    "invalid_json": "invalid JSON",
    "not_object": "record is not a JSON object",
    "wrong_type": "field has the wrong type",
    "missing_field": "required field missing",
    "empty_response": "empty response",
    "unknown_role": "unknown role",
    "no_assistant_turn": "no assistant turn",
    "non_utf8": "bytes that are not valid UTF-8",
    "bom": "byte-order mark (BOM) at start of file",
    "mixed_formats": "record format differs from the rest of the file",
    "unknown_format": "cannot detect the record format",
    "template": "chat template cannot render this conversation exactly",
    "no_trained_tokens": "no token is trained",
    "empty_file": "file holds no records",
    "unreadable_file": "file cannot be read (corrupt, truncated, or gone)",
    "bad_choices": "multiple-choice options without a gold answer",
}


@dataclass(frozen=True)
class Location:
    """Where a record lives: file plus 1-based line (text files) or 0-based record index."""

    file: str
    line: int | None = None
    index: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}:{self.line}"
        if self.index is not None:
            return f"{self.file}[record {self.index}]"
        return self.file


class DataError(ValueError):
    """One invalid record. `str(err)` is `FILE:LINE: reason: detail`."""

    def __init__(self, where: Location, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        self.where, self.reason, self.detail = where, reason, detail
        text = f"{where}: {REASONS[reason]}" + (f": {detail}" if detail else "")
        super().__init__(text)

    def __reduce__(self):  # rebuilt from its parts in another process (data.num_workers)
        return DataError, (self.where, self.reason, self.detail)


@dataclass
class InvalidLog:
    """Counts per reason of the records skipped under --skip-invalid, with the first few messages."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    keep: int = 20
    first: DataError | None = None

    def add(self, err: DataError) -> None:
        self.first = self.first or err
        self.counts[err.reason] += 1
        if len(self.examples) < self.keep:
            self.examples.append(str(err))

    @property
    def total(self) -> int:
        return sum(self.counts.values())
