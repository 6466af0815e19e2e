"""Record formats (alpaca, prompt/completion, messages, sharegpt) normalised to one `Conversation`.

Every normaliser is a pure function `record -> Conversation` that raises `DataError` with the
record's location and the reason when the record is malformed.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field

from ..config import DataFormat
from .validate import DataError, Location

FORMATS = typing.get_args(DataFormat)
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "tool": "tool", "function": "tool", "observation": "tool", "function_call": "assistant"}
REASONING_FIELDS = ("reasoning_content", "thinking")  # an assistant's reasoning, under the names templates read


@dataclass
class Message:
    role: str
    content: str
    train: bool | None = None  # None: the role's default (assistant trained, others not)
    reasoning: str | None = None  # an assistant's reasoning trace given beside its content
    tool_calls: list | None = None  # an assistant's tool calls (OpenAI form: [{"type", "function": {...}}])
    fields: dict = field(default_factory=dict)  # other keys templates read: tool_call_id, name

    def as_dict(self) -> dict:
        """The message as chat templates receive it (reasoning under both names templates use)."""
        d = {"role": self.role, "content": self.content, **self.fields}
        if self.reasoning is not None:
            d.update({name: self.reasoning for name in REASONING_FIELDS})
        if self.tool_calls is not None:
            d["tool_calls"] = self.tool_calls
        return d

    @property
    def trained(self) -> bool:
        return self.role == "assistant" if self.train is None else (self.train and self.role == "assistant")


@dataclass
class Conversation:
    messages: list[Message]
    task: str | None = None
    where: Location | None = field(default=None, compare=False)
    tools: list | None = None  # JSON schemas of the tools the conversation may call (given to the template)

    def as_dicts(self, with_train: bool = False) -> list[dict]:
        """Messages-format dicts; `with_train` keeps a message's explicit `train` flag (written data reads back)."""
        return [{**m.as_dict(), **({"train": m.train} if with_train and m.train is not None else {})}
                for m in self.messages]

    def key(self) -> tuple:
        """Identity for exact-duplicate detection (structured parts as canonical JSON; an empty one as itself)."""
        return (tuple((m.role, m.content, m.train, m.reasoning, _canonical(m.tool_calls), _canonical(m.fields))
                      for m in self.messages), _canonical(self.tools))


def _canonical(value) -> str:
    """A structured part as canonical JSON (an empty one, the common case, without the JSON encoder)."""
    return json.dumps(value, sort_keys=True) if value else repr(value)


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


def _content(value, where: Location, name: str) -> str:
    """A message's text: a string, or OpenAI-style text parts [{"type": "text", "text": ...}] joined by newlines."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise DataError(where, "wrong_type", f"{name}[{j}] is a {kind or type(part).__name__!r} content part; "
                                                     f"only text parts ({{'type': 'text', 'text': ...}}) are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise DataError(where, "wrong_type", f"{name} must be a string or a list of text parts, got {type(value).__name__}")


def _tool_calls(value, where: Location, name: str) -> list:
    """An assistant's tool calls, each {"type": "function", "function": {"name": str, "arguments": dict | str}};
    a bare {"name", "arguments"} is taken as the function."""
    calls = value if isinstance(value, list) else [value]
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                not isinstance(fn.get("arguments", {}), (dict, str)):
            raise DataError(where, "wrong_type", f"{name}[{j}] must be a tool call with a function name and "
                                                 f"arguments (an object or a JSON string)")
        out.append({**(call if "function" in call else {}), "type": call.get("type", "function"),
                    "function": {"name": fn["name"], "arguments": fn.get("arguments", {})}})
    return out


def _message_list(value, where: Location, name: str, role_key="role", content_key="content",
                  role_map: dict | None = None) -> list[Message]:
    if not isinstance(value, list):
        raise DataError(where, "wrong_type", f"{name!r} must be a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(where, "wrong_type", f"{name}[{i}] must be an object, got {type(m).__name__}")
        if role_key not in m:
            raise DataError(where, "missing_field", f"{name}[{i}].{role_key}")
        role = m[role_key]
        if not isinstance(role, str):
            raise DataError(where, "wrong_type", f"{name}[{i}].{role_key} must be a string")
        mapped = (role_map or {r: r for r in ROLES}).get(role)
        if mapped is None:
            raise DataError(where, "unknown_role", f"{name}[{i}].{role_key} = {role!r}")
        calls = None
        if role == "function_call":  # sharegpt: the value is the call, {"name": ..., "arguments": ...} as JSON
            try:
                calls = _tool_calls(json.loads(m.get(content_key) or "null"), where, f"{name}[{i}].{content_key}")
            except json.JSONDecodeError:
                raise DataError(where, "wrong_type", f"{name}[{i}].{content_key} must be a JSON tool call") from None
            content = ""
        else:
            if m.get("tool_calls") is not None:
                if mapped != "assistant":
                    raise DataError(where, "wrong_type", f"{name}[{i}].tool_calls on a {mapped} message")
                calls = _tool_calls(m["tool_calls"], where, f"{name}[{i}].tool_calls")
            if content_key not in m and calls is None:
                raise DataError(where, "missing_field", f"{name}[{i}].{content_key}")
            raw = m.get(content_key)
            content = "" if raw is None and calls is not None else _content(raw, where, f"{name}[{i}].{content_key}")
        train = m.get("train")
        if train is not None and not isinstance(train, bool):
            raise DataError(where, "wrong_type", f"{name}[{i}].train must be true or false")
        reasoning = next((m[f] for f in REASONING_FIELDS if m.get(f) is not None), None)
        if reasoning is not None and (mapped != "assistant" or not isinstance(reasoning, str)):
            raise DataError(where, "wrong_type", f"{name}[{i}]: reasoning must be a string on an assistant message")
        fields = {k: m[k] for k in ("tool_call_id", "name") if isinstance(m.get(k), str)}
        out.append(Message(mapped, content, train, reasoning, calls, fields))
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
        if m.role == "assistant" and m.trained and not m.content.strip() and not m.tool_calls:
            raise DataError(where, "empty_response", f"assistant message {i} is empty")
    tools = rec.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise DataError(where, "wrong_type", "'tools' must be a list of tool schemas (objects)")
    return Conversation(messages, task, where, tools)
