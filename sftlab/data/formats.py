"""Record formats (alpaca, prompt/completion, messages, sharegpt) normalised to one `Conversation`.

Every normaliser is a pure function `record -> Conversation` that raises `DataError` with the
record's location and the reason when the record is malformed.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from ..config import DataFormat
from .validate import DataError, Location

FORMATS = typing.get_args(DataFormat)
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "tool": "tool", "function": "tool", "observation": "tool"}


@dataclass
class Message:
    role: str
    content: str
    train: bool | None = None  # None: the role's default (assistant trained, others not)

    @property
    def trained(self) -> bool:
        return self.role == "assistant" if self.train is None else (self.train and self.role == "assistant")


@dataclass
class Conversation:
    messages: list[Message]
    task: str | None = None
    where: Location | None = field(default=None, compare=False)

    def as_dicts(self, with_train: bool = False) -> list[dict]:
        """Messages-format dicts; `with_train` keeps a message's explicit `train` flag (written data reads back)."""
        return [{"role": m.role, "content": m.content,
                 **({"train": m.train} if with_train and m.train is not None else {})} for m in self.messages]

    def key(self) -> tuple:
        """Identity for exact-duplicate detection."""
        return tuple((m.role, m.content, m.train) for m in self.messages)


def detect_format(rec: dict) -> str | None:
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    return None


def _str_field(rec: dict, name: str, where: Location, required: bool = True) -> str:
    if name not in rec or rec[name] is None:
        if required:
            raise DataError(where, "missing_field", f"{name!r}")
        return ""
    v = rec[name]
    if not isinstance(v, str):
        raise DataError(where, "wrong_type", f"{name!r} must be a string, got {type(v).__name__}")
    return v


def from_alpaca(rec: dict, where: Location) -> list[Message]:
    instruction = _str_field(rec, "instruction", where)
    inp = _str_field(rec, "input", where, required=False)
    output = _str_field(rec, "output", where)
    system = _str_field(rec, "system", where, required=False)
    user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
    msgs = [Message("system", system)] if system else []
    return msgs + [Message("user", user), Message("assistant", output)]


def _message_list(value, where: Location, name: str, role_key="role", content_key="content",
                  role_map: dict | None = None) -> list[Message]:
    if not isinstance(value, list):
        raise DataError(where, "wrong_type", f"{name!r} must be a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(where, "wrong_type", f"{name}[{i}] must be an object, got {type(m).__name__}")
        for k in (role_key, content_key):
            if k not in m:
                raise DataError(where, "missing_field", f"{name}[{i}].{k}")
        role, content = m[role_key], m[content_key]
        if not isinstance(role, str):
            raise DataError(where, "wrong_type", f"{name}[{i}].{role_key} must be a string")
        if not isinstance(content, str):
            raise DataError(where, "wrong_type", f"{name}[{i}].{content_key} must be a string, got {type(content).__name__}")
        mapped = (role_map or {r: r for r in ROLES}).get(role)
        if mapped is None:
            raise DataError(where, "unknown_role", f"{name}[{i}].{role_key} = {role!r}")
        train = m.get("train")
        if train is not None and not isinstance(train, bool):
            raise DataError(where, "wrong_type", f"{name}[{i}].train must be true or false")
        out.append(Message(mapped, content, train))
    return out


def _require(rec: dict, name: str, where: Location):
    if rec.get(name) is None:
        raise DataError(where, "missing_field", f"{name!r}")
    return rec[name]


def from_prompt_completion(rec: dict, where: Location) -> list[Message]:
    prompt, completion = _require(rec, "prompt", where), _require(rec, "completion", where)
    system = _str_field(rec, "system", where, required=False)
    head = [Message("system", system)] if system else []
    if isinstance(prompt, str) and isinstance(completion, str):
        return head + [Message("user", prompt), Message("assistant", completion)]
    if isinstance(prompt, list) and isinstance(completion, list):
        # The prompt is context: assistant turns inside it (few-shot answers) are not trained.
        pmsgs = _message_list(prompt, where, "prompt")
        for m in pmsgs:
            m.train = False if m.train is None else m.train
        return head + pmsgs + _message_list(completion, where, "completion")
    if isinstance(prompt, list) and isinstance(completion, str):
        return head + _message_list(prompt, where, "prompt") + [Message("assistant", completion)]
    for name, v in (("prompt", prompt), ("completion", completion)):
        if not isinstance(v, (str, list)):
            raise DataError(where, "wrong_type", f"{name!r} must be a string or a list of messages, got {type(v).__name__}")
    raise DataError(where, "wrong_type", "'prompt' is a string but 'completion' is a message list")


def from_messages(rec: dict, where: Location) -> list[Message]:
    return _message_list(_require(rec, "messages", where), where, "messages")


def from_sharegpt(rec: dict, where: Location) -> list[Message]:
    msgs = _message_list(_require(rec, "conversations", where), where, "conversations", "from", "value",
                         SHAREGPT_ROLES)
    system = rec.get("system")
    if isinstance(system, str) and system:
        msgs = [Message("system", system)] + msgs
    return msgs


NORMALISERS = {"alpaca": from_alpaca, "prompt_completion": from_prompt_completion,
               "messages": from_messages, "sharegpt": from_sharegpt}


def strip_suffixes(text: str, suffixes: tuple[str, ...]) -> str:
    """Remove trailing artefacts (e.g. a literal '<|endoftext|>'), repeatedly, with any whitespace after them;
    the text before an artefact is kept as it is."""
    changed = True
    while changed and suffixes:
        changed = False
        for s in suffixes:
            if s and text.rstrip().endswith(s):
                text = text.rstrip()[: -len(s)]
                changed = True
    return text


def to_conversation(rec, where: Location, fmt: str, task: str | None = None,
                    strip: tuple[str, ...] = ()) -> Conversation:
    """Normalise one record of format `fmt`; checks roles, an assistant turn and non-empty responses."""
    if not isinstance(rec, dict):
        raise DataError(where, "not_object", f"got {type(rec).__name__}")
    messages = NORMALISERS[fmt](rec, where)
    if strip:
        for m in messages:
            if m.role == "assistant":
                m.content = strip_suffixes(m.content, strip)
    if not any(m.role == "assistant" for m in messages):
        raise DataError(where, "no_assistant_turn")
    for i, m in enumerate(messages):
        if m.role == "assistant" and m.trained and not m.content.strip():
            raise DataError(where, "empty_response", f"assistant message {i} is empty")
    return Conversation(messages, task, where)
