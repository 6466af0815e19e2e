"""Chat templates: resolve one (tokenizer's own, built-in `chatml`/`alpaca`, or a Jinja file), render a
conversation, and locate every message's content and every assistant turn's trained text.

The ground truth for assistant turn k is what the model must produce at inference: the text the template renders
for that message after `render(messages[:k], add_generation_prompt=True)`, end-of-turn marker included (trailing
whitespace after the marker is not trained). It is found without template-specific string search: the turn
rendered as the last message must start with its inference prompt, and what follows is trained as it is, so a
separator the template writes before the answer (Llama-2 and Mistral: ` answer</s>`) is trained as the template's
own text.

One example covers every trained turn whose truth is a prefix of it. A template that rewrites history (Qwen3
drops earlier turns' reasoning, Mistral moves the system prompt to the last user turn, Llama-3.1 dates its system
header) gives a conversation several examples: each uncovered turn, last first, in its own inference context, and
each example covers the earlier turns that are still exact in it. `data inspect` reports the extra tokens.
Prefix checks are made only for assistant turns; user and system messages are never rendered alone.

Templates with `{% generation %}` blocks (TRL's training templates) are trained where their blocks are, as
transformers' `return_assistant_tokens_mask` defines it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .formats import Conversation

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


_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateError(ValueError):
    """The template cannot render this conversation with exactly locatable assistant spans."""


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


# the text of a {% generation %} block is wrapped in these while rendering, then cut out with its offsets recorded
_GEN_OPEN, _GEN_CLOSE = "\ue000sftlab-generation\ue001", "\ue000/sftlab-generation\ue001"


class GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}`: the block's text, marked so its offsets can be recovered."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
        return _GEN_OPEN + caller() + _GEN_CLOSE


def _generation_blocks(text: str) -> tuple[str, list[tuple[int, int]]]:
    """The text without generation markers, and the [start, end) offsets of each block in it."""
    out, blocks, pos = [], [], 0
    while (i := text.find(_GEN_OPEN, pos)) >= 0:
        j = text.find(_GEN_CLOSE, i)
        out.append(text[pos:i])
        start = sum(map(len, out))
        out.append(text[i + len(_GEN_OPEN):j])
        blocks.append((start, start + j - i - len(_GEN_OPEN)))
        pos = j + len(_GEN_CLOSE)
    out.append(text[pos:])
    return "".join(out), blocks


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    # Same sandbox and helpers as transformers' apply_chat_template, so templates render identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, GenerationTag])
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

    @property
    def has_generation_blocks(self) -> bool:
        return "generation" in self.source and bool(_GENERATION_RE.search(self.source))

    def with_tools(self, tools: list | None) -> ChatTemplate:
        """This template rendering with `tools` (JSON schemas) as apply_chat_template passes them."""
        return self if tools is None else ChatTemplate(self.name, self.source, {**self.context, "tools": tools})

    def render_marked(self, messages: list[dict], add_generation_prompt: bool = False
                      ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the offsets of its `{% generation %}` blocks."""
        try:
            raw = _compile(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                               **self.context)
        except jinja2.exceptions.TemplateError as e:
            raise TemplateError(f"template {self.name!r} failed: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:  # the template's own code
            raise TemplateError(f"template {self.name!r} failed: {type(e).__name__}: {e}") from None
        return _generation_blocks(raw)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.render_marked(messages, add_generation_prompt)[0]


def resolve_template(name: str | None, tokenizer) -> ChatTemplate:
    """`default`/None: the tokenizer's own chat template; `chatml`, `alpaca`; or a path to a Jinja file."""
    context = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    context.setdefault("eos_token", tokenizer.eos_token or "")
    context.setdefault("bos_token", tokenizer.bos_token or "")
    context.update(tools=None, documents=None)  # apply_chat_template always passes both (None when absent)
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
    start: int  # where this message's rendered text starts (after the previous located message)
    content_start: int | None  # None: content not found verbatim
    content_end: int | None
    end: int  # end of the trained text (assistant turns trained here); end of its content otherwise
    trained: bool  # an assistant turn trained in this example
    train_start: int | None = None  # where its trained text starts: right after its inference prompt


@dataclass
class Rendered:
    text: str
    regions: list[Region]

    def assistant_regions(self) -> list[Region]:
        return [r for r in self.regions if r.role == "assistant"]

    def trained_regions(self) -> list[Region]:
        return [r for r in self.regions if r.trained]


_PROBE = "sftlabProbe7f3a9c"  # plain text: survives trim, tojson and escaping


def _content_start(tmpl: ChatTemplate, msgs: list[dict], k: int, full: str, start: int) -> int | None:
    """Where message k's content starts in `full` (a render of msgs[:k+1] or more), searching from `start`;
    None if not verbatim.

    A content that occurs more than once (e.g. a user message '<|im_end|>', or 'user') is located by rendering
    the message with a probe content instead, which gives the template's header for it."""
    content = msgs[k]["content"]
    cs = full.find(content, start) if content else -1
    if cs < 0 or full.find(content, cs + 1) < 0:
        return cs if cs >= 0 else None
    try:
        probe = tmpl.render(msgs[:k] + [{**msgs[k], "content": _PROBE}])
    except TemplateError:
        return None
    hs = probe.find(_PROBE, start)
    if hs >= 0 and probe[:hs] == full[:hs] and full.startswith(content, hs):
        return hs
    return None


@dataclass
class Turn:
    """Assistant message k in its inference context: `text` = render(msgs[:k+1]), which starts with its inference
    prompt render(msgs[:k], add_generation_prompt=True); text[train_start:end] is the truth (trained)."""

    message: int
    text: str
    train_start: int
    end: int
    content_start: int | None
    content_end: int | None

    @property
    def truth(self) -> str:
        return self.text[:self.end]


def _first_difference(a: str, b: str) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at character {i}: the prompt has {a[i:i + 30]!r}, the turn {b[i:i + 30]!r}"


REASONING_OPEN, REASONING_CLOSE = "<think>", "</think>"
EMPTY_REASONING = "\n" + REASONING_CLOSE + "\n\n"  # trained after a prompt that opens a block the record lacks


def _answer_start(tmpl: ChatTemplate, text: str, msgs: list[dict], k: int) -> tuple[int, str] | None:
    """Where, in `text` (the turn rendered as the last message), the assistant's own text starts when `text` does
    not continue the inference prompt (the template renders the context differently at inference: Mistral moves
    the system prompt into the last user turn), and what the prompt has beyond the aligned text (a reasoning
    block it opens).

    Aligned on the message before the assistant: rendered with a probe content in place of its own, the template
    text after it that prompt and turn share ends where the answer starts."""
    before = msgs[k - 1] if k > 0 else None
    if before is None or before["role"] == "assistant":
        return None
    probed = msgs[:k - 1] + [{**before, "content": _PROBE}]
    try:
        prompt = tmpl.render(probed, add_generation_prompt=True)
        turn = tmpl.render(probed + [msgs[k]])
    except TemplateError:
        return None
    if prompt.count(_PROBE) != 1 or turn.count(_PROBE) != 1:
        return None
    pe, te = prompt.index(_PROBE) + len(_PROBE), turn.index(_PROBE) + len(_PROBE)
    n = 0
    while pe + n < len(prompt) and te + n < len(turn) and prompt[pe + n] == turn[te + n]:
        n += 1
    answer = turn[te + n:]
    if not text.endswith(answer):
        return None
    return len(text) - len(answer), prompt[pe + n:]


def _reasoning_truth(content: str, opened: str, reasoning: str | None = None) -> str:
    """The trained text after a prompt that ends with `opened` (an opening reasoning tag): the record's reasoning
    up to and including its closing tag (from the content's block, or the message's reasoning field written as
    `reasoning\n</think>`), or an empty block's close where the record has none."""
    if reasoning and not content.lstrip().startswith(REASONING_OPEN):
        return reasoning.strip() + "\n" + REASONING_CLOSE
    body = content.lstrip()
    if not body.startswith(REASONING_OPEN) or REASONING_CLOSE not in body:
        return EMPTY_REASONING
    body = body[len(REASONING_OPEN):]
    tail = opened[opened.index(REASONING_OPEN) + len(REASONING_OPEN):]
    if tail and body.startswith(tail):
        body = body[len(tail):]
    return body[:body.index(REASONING_CLOSE) + len(REASONING_CLOSE)]


def assistant_turn(tmpl: ChatTemplate, msgs: list[dict], k: int, train_reasoning: bool = True) -> Turn:
    """The ground truth of assistant message k (see the module docstring). train_reasoning=False: the trained
    text starts after the turn's reasoning (its closing tag, or the reasoning text where there is none)."""
    prompt = tmpl.render(msgs[:k], add_generation_prompt=True)
    text = tmpl.render(msgs[:k + 1])
    if not text.startswith(prompt):
        aligned = _answer_start(tmpl, text, msgs, k)
        if aligned is None or (aligned[1] and aligned[1].strip() != REASONING_OPEN):
            raise TemplateError(f"template {tmpl.name!r}: the text it renders for assistant message {k} does not "
                                f"continue its own inference prompt ({_first_difference(prompt, text)}), so no "
                                f"trained text matches what the model would generate")
        x, opened = aligned
        answer = text[x:]
        if opened:  # the prompt opens a reasoning block (DeepSeek-R1, QwQ): its reasoning, the close, the answer
            reasoning = _reasoning_truth(msgs[k]["content"], opened, msgs[k].get("reasoning_content"))
            answer = reasoning + (answer.lstrip("\n") if reasoning == EMPTY_REASONING else answer)
        text = prompt + answer
    start = len(prompt)
    end = start + len(text[start:].rstrip())
    if end == start:
        raise TemplateError(f"template {tmpl.name!r} renders nothing for assistant message {k} after its prompt")
    content = msgs[k]["content"]
    cs = None
    for c in (content, content.strip()):
        i = text.find(c, start, end) if c else -1
        if i >= 0:
            cs, content = i, c
            break
    ce = cs + len(content) if cs is not None else None
    end = max(end, ce or 0)
    _check_rendered(tmpl, msgs[k], k, text[start:end])
    if not train_reasoning:
        start = _after_reasoning(text, start, end, msgs[k])
    return Turn(k, text, start, end, cs, ce)


def _check_rendered(tmpl: ChatTemplate, msg: dict, k: int, truth: str) -> None:
    """An assistant's tool calls and reasoning must be in its trained text, or the template drops them silently."""
    for call in msg.get("tool_calls") or ():
        if call["function"]["name"] not in truth:
            raise TemplateError(f"template {tmpl.name!r} does not render the tool calls of assistant message {k} "
                                f"({call['function']['name']!r} is missing from its text); use the model's own "
                                f"template with tool support")
    reasoning = msg.get("reasoning_content")
    if reasoning and reasoning.strip() not in truth:
        raise TemplateError(f"template {tmpl.name!r} does not render the reasoning of assistant message {k} "
                            f"(reasoning_content); use a template that does, or write it into the content as "
                            f"{REASONING_OPEN}...{REASONING_CLOSE}")


def _after_reasoning(text: str, start: int, end: int, msg: dict) -> int:
    """Where the trained text starts when reasoning is context only: after the reasoning block's closing tag, or
    after the reasoning text itself (templates that mark it otherwise, e.g. gpt-oss's analysis channel)."""
    close = text.find(REASONING_CLOSE, start, end)
    if close >= 0:
        return close + len(REASONING_CLOSE)
    reasoning = (msg.get("reasoning_content") or "").strip()
    at = text.find(reasoning, start, end) if reasoning else -1
    return at + len(reasoning) if at >= 0 else start


def _locate(tmpl: ChatTemplate, msgs: list[dict], text: str, turns: dict[int, Turn]) -> list[Region]:
    """Regions of msgs (all rendered in `text`, in order): the assistant turns in `turns` trained at their truth,
    every other message located by its content."""
    regions, pos = [], 0
    for k, m in enumerate(msgs):
        if k in turns:
            t = turns[k]
            regions.append(Region(k, m["role"], pos, t.content_start, t.content_end, t.end, True, t.train_start))
            pos = t.end
            continue
        cs = _content_start(tmpl, msgs, k, text, pos)
        ce = cs + len(m["content"]) if cs is not None else None
        regions.append(Region(k, m["role"], pos, cs, ce, ce if ce is not None else pos, False))
        pos = ce if ce is not None else pos
    return regions


def _generation_rendered(conv: Conversation, tmpl: ChatTemplate) -> list[Rendered]:
    """A `{% generation %}` template: one example, trained exactly where its generation blocks are."""
    tmpl = tmpl.with_tools(conv.tools)
    msgs = conv.as_dicts()
    text, blocks = tmpl.render_marked(msgs)
    if not blocks and any(m.role == "assistant" for m in conv.messages):
        raise TemplateError(f"template {tmpl.name!r} has {{% generation %}} blocks but renders none for this "
                            "conversation")
    regions = _locate(tmpl, msgs, text, {})
    for r in regions:
        r.trained = False
    for a, b in blocks:
        regions.append(Region(-1, "assistant", a, None, None, b, True, a))
    return [Rendered(text, regions)]


def render_conversation(conv: Conversation, tmpl: ChatTemplate, loss_on: str = "assistant",
                        train_reasoning: bool = True) -> list[Rendered]:
    """The conversation as training examples (usually one; more where the template rewrites history).

    loss_on: "assistant" trains every assistant turn marked trained, "last_assistant" only the last one, "all"
    renders the whole conversation once (every token is trained). The conversation's tools go to the template."""
    tmpl = tmpl.with_tools(conv.tools)
    msgs = conv.as_dicts()
    assistants = [k for k, m in enumerate(conv.messages) if m.role == "assistant"]
    if loss_on == "all" or not assistants:
        text = tmpl.render(msgs)
        return [Rendered(text, _locate(tmpl, msgs, text, {}))]
    if tmpl.has_generation_blocks:
        return _generation_rendered(conv, tmpl)
    targets = [k for k in assistants if conv.messages[k].trained]
    if loss_on == "last_assistant":
        targets = [k for k in targets if k == assistants[-1]]
    if not targets:  # nothing trained: the whole conversation, so the caller reports no trained tokens
        text = tmpl.render(msgs[:assistants[-1] + 1])
        return [Rendered(text, _locate(tmpl, msgs[:assistants[-1] + 1], text, {}))]
    turns = {k: assistant_turn(tmpl, msgs, k, train_reasoning) for k in targets}
    out, covered = [], set()
    for k in reversed(targets):
        if k in covered:
            continue
        text = turns[k].text
        group = {j: turns[j] for j in targets if j <= k and j not in covered and text.startswith(turns[j].truth)}
        covered |= set(group)
        out.append(Rendered(text, _locate(tmpl, msgs[:k + 1], text, group)))
    return out[::-1]


def render_turn(conv: Conversation, tmpl: ChatTemplate, k: int, train_reasoning: bool = True) -> Rendered:
    """Assistant message k alone in its inference context: the only trained turn of its example."""
    tmpl = tmpl.with_tools(conv.tools)
    msgs = conv.as_dicts()[:k + 1]
    turn = assistant_turn(tmpl, msgs, k, train_reasoning)
    return Rendered(turn.text, _locate(tmpl, msgs, turn.text, {k: turn}))


def render_prompt(messages: list[dict], tmpl: ChatTemplate) -> Rendered:
    """The inference prompt for `messages` with every message's content located (for plain-text encoding)."""
    text = tmpl.render(messages, add_generation_prompt=True)
    return Rendered(text, _locate(tmpl, messages, text, {}))


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
    turn = assistant_turn(tmpl, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], 1)
    if turn.content_end is None:
        raise TemplateError(f"template {tmpl.name!r} does not write an assistant's content verbatim")
    return turn.text[turn.content_end:turn.end]


def end_of_turn_ids(tmpl: ChatTemplate, tokenizer) -> list[int]:
    """Token ids of the end-of-turn marker (falls back to the tokenizer's EOS when the template has none)."""
    marker = end_of_turn_text(tmpl)
    ids = tokenizer(marker, add_special_tokens=False).input_ids if marker else []
    return ids or [tokenizer.eos_token_id]
