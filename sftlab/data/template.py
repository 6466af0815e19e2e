"""Chat templates: resolve one (tokenizer's own, built-in `chatml`/`alpaca`, or a Jinja file), render a
conversation, and locate every message's content and every assistant turn's end-of-turn text.

Spans are found without template-specific string search: the conversation is rendered one message at
a time and each render must extend the previous one (prefix stability). The text a message adds is
then `header + content + trailer`; the assistant's header is what the generation prompt adds, and the
trailer's text up to its trailing whitespace is the end-of-turn marker (ChatML: `<|im_end|>`, with the
newline after it left untrained). A template that rewrites earlier turns, or hides the content, gets a
`TemplateError` instead of a silently wrong mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .formats import Conversation, Message

BUILTIN_TEMPLATES = {
    # ChatML with no default system prompt.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Stanford-Alpaca prompt style for base models; the response ends with the tokenizer's EOS token.
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}"
        "{% if loop.first %}{{ 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n' }}{% endif %}"
        "{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
        "{% else %}{{ '### ' + message['role']|capitalize + ':\n' + message['content'] + '\n\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}


class TemplateError(ValueError):
    """The template cannot render this conversation with exactly locatable assistant spans."""


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    # Same sandbox and helpers as transformers' apply_chat_template, so templates render identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


@dataclass
class ChatTemplate:
    name: str
    source: str
    context: dict  # bos_token, eos_token, ... as apply_chat_template passes them

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return _compile(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **self.context)
        except jinja2.exceptions.TemplateError as e:
            raise TemplateError(f"template {self.name!r} failed: {e}") from None


def resolve_template(name: str | None, tokenizer) -> ChatTemplate:
    """`default`/None: the tokenizer's own chat template; `chatml`, `alpaca`; or a path to a Jinja file."""
    context = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    context.setdefault("eos_token", tokenizer.eos_token or "")
    context.setdefault("bos_token", tokenizer.bos_token or "")
    if name in (None, "default"):
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):
            source = source.get("default")
        if not source:
            raise TemplateError("the tokenizer has no chat template; pass --template chatml, alpaca or a .jinja file")
        return ChatTemplate("default", source, context)
    if name in BUILTIN_TEMPLATES:
        return ChatTemplate(name, BUILTIN_TEMPLATES[name], context)
    path = Path(name)
    if path.is_file():
        return ChatTemplate(str(path), path.read_text(encoding="utf-8"), context)
    raise TemplateError(f"--template {name!r}: not 'default', a built-in ({', '.join(BUILTIN_TEMPLATES)}) or a file")


@dataclass
class Region:
    """One message's place in the rendered text (character offsets)."""

    message: int
    role: str
    start: int  # where this message's rendered text starts (its header)
    content_start: int | None  # None: content not found verbatim (only allowed for non-assistant turns)
    content_end: int | None
    end: int  # end of the trained text: content + end-of-turn marker (assistant); end of its text otherwise
    trained: bool  # assistant turn whose loss is on (per-message `train`)


@dataclass
class Rendered:
    text: str
    regions: list[Region]

    def assistant_regions(self) -> list[Region]:
        return [r for r in self.regions if r.role == "assistant"]


_PROBE = "\x00sftlab-probe\x00"


def _content_start(tmpl: ChatTemplate, msgs: list[dict], k: int, full: str, start: int) -> int | None:
    """Where message k's content starts in `full` (rendered up to k), searching from `start`; None if not verbatim.

    A content that occurs more than once (e.g. a user message '<|im_end|>', or 'user') is located by rendering
    the message with a probe content instead, which gives the template's header for it."""
    content = msgs[k]["content"]
    cs = full.find(content, start) if content else -1
    if cs < 0 or full.find(content, cs + 1) < 0:
        return cs if cs >= 0 else None
    probe = tmpl.render(msgs[:k] + [{**msgs[k], "content": _PROBE}])
    hs = probe.find(_PROBE, start)
    if hs >= 0 and probe[:hs] == full[:hs] and full.startswith(content, hs):
        return hs
    return None


def render_conversation(conv: Conversation, tmpl: ChatTemplate) -> Rendered:
    msgs = conv.as_dicts()
    prev = ""
    regions: list[Region] = []
    for k, m in enumerate(conv.messages):
        full = tmpl.render(msgs[: k + 1])
        if not full.startswith(prev):
            raise TemplateError(f"template {tmpl.name!r} is not prefix-stable: adding message {k} ({m.role}) "
                                "changes the text rendered for the earlier messages")
        if m.role == "assistant":
            head = tmpl.render(msgs[:k], add_generation_prompt=True)
            if not (head.startswith(prev) and full.startswith(head)):
                raise TemplateError(f"template {tmpl.name!r}: the generation prompt for message {k} is not a prefix "
                                    "of the rendered assistant turn, so training and inference would differ")
            rest = full[len(head):]
            content = m.content if rest.startswith(m.content) else m.content.strip()
            if not rest.startswith(content):
                raise TemplateError(f"template {tmpl.name!r} changes the text of assistant message {k}; its "
                                    "content does not follow the assistant header verbatim")
            cs = len(head)
            ce = cs + len(content)
            eot = len(full[ce:].rstrip())  # the end-of-turn marker; trailing separators are not trained
            regions.append(Region(k, m.role, len(prev), cs, ce, ce + eot, m.trained))
        else:
            cs = _content_start(tmpl, msgs, k, full, len(prev))
            regions.append(Region(k, m.role, len(prev), cs, cs + len(m.content) if cs is not None else None,
                                  len(full), False))
        prev = full
    return Rendered(prev, regions)


def generation_prompt(messages: list[dict], tmpl: ChatTemplate) -> str:
    """The text a model sees at inference before it answers (same template as training)."""
    return tmpl.render(messages, add_generation_prompt=True)


def assistant_header(tmpl: ChatTemplate) -> str:
    """The text the template writes before an assistant's content with nothing before it (for s(y))."""
    probe = [{"role": "user", "content": "\x00"}]
    with_user = tmpl.render(probe)
    with_prompt = tmpl.render(probe, add_generation_prompt=True)
    if not with_prompt.startswith(with_user):
        raise TemplateError(f"template {tmpl.name!r}: generation prompt does not extend the conversation")
    return with_prompt[len(with_user):]


def end_of_turn_text(tmpl: ChatTemplate) -> str:
    """The marker the template writes after an assistant's content (ChatML: `<|im_end|>`)."""
    probe = Conversation([Message("user", "x"), Message("assistant", "y")])
    rendered = render_conversation(probe, tmpl)
    region = rendered.assistant_regions()[-1]
    return rendered.text[region.content_end:region.end]


def end_of_turn_ids(tmpl: ChatTemplate, tokenizer) -> list[int]:
    """Token ids of the end-of-turn marker (falls back to the tokenizer's EOS when the template has none)."""
    marker = end_of_turn_text(tmpl)
    ids = tokenizer(marker, add_special_tokens=False).input_ids if marker else []
    return ids or [tokenizer.eos_token_id]
