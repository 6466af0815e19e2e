"""Real chat templates (../shared/templates): every trained turn is exactly what inference generates.

The oracle is independent of sftlab's renderer: transformers' `apply_chat_template` gives, for assistant turn k,
its inference prompt render(msgs[:k], add_generation_prompt=True) and the turn render(msgs[:k+1]); the truth is
what the turn adds after the prompt (trailing whitespace untrained). For every (template, conversation):
either sftlab's examples train exactly the truth of every assistant turn, once, each after exactly the tokens of
its inference prompt; or the oracle has no truth (the template rejects the conversation, or its turn does not
continue its own prompt) and sftlab's error names the template and, where the template raised, quotes it.
The tokenizer is SmolLM2's with the template's own markers added as special tokens.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from conftest import SHARED

# SFTLAB_EXTRA_TEMPLATES: a directory of more real templates to run the same oracle on (not in CI)
TEMPLATES = sorted((SHARED.parent / "templates").glob("*.jinja")) + sorted(
    Path(os.environ["SFTLAB_EXTRA_TEMPLATES"]).glob("*.jinja") if os.environ.get("SFTLAB_EXTRA_TEMPLATES") else [])
BY_NAME = {t.name: t for t in TEMPLATES}
GENERATION_TEMPLATES = sorted((SHARED.parent / "templates" / "trl-training").glob("*.jinja"))
MARKERS = re.compile(r"<\|[^<>|\s]{1,40}\|>|<｜[^<>\s]{1,40}｜>|\[/?[A-Z_]{3,24}\]|</?[a-z_]{3,30}>|<\|[a-z_]+\|?")

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    "system": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+2?"},
               {"role": "assistant", "content": "4"}],
    "multi": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello! How can I help?"},
              {"role": "user", "content": "Say bye."}, {"role": "assistant", "content": "Bye."}],
    "multi_system": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "a"},
                     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                     {"role": "assistant", "content": "d e f"}],
    "unicode": [{"role": "user", "content": "Übersetze: 猫"}, {"role": "assistant", "content": "Katze 🐱 — ja."}],
    "reasoning": [{"role": "user", "content": "What is 3*4?"},
                  {"role": "assistant", "content": "<think>\nThree fours.\n</think>\n\n12"},
                  {"role": "user", "content": "And 5*5?"},
                  {"role": "assistant", "content": "<think>\nFive fives.\n</think>\n\n25"}],
    "multiline": [{"role": "user", "content": "List two."}, {"role": "assistant", "content": "- one\n- two"}],
    "three_turns": [{"role": "user", "content": "1"}, {"role": "assistant", "content": "one"},
                    {"role": "user", "content": "2"}, {"role": "assistant", "content": "two"},
                    {"role": "user", "content": "3"}, {"role": "assistant", "content": "three"}],
    "reasoning_field": [{"role": "user", "content": "What is 3*4?"},
                        {"role": "assistant", "content": "12", "reasoning_content": "Three fours."}],
    "tools": [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"id": "abc123def", "type": "function",
                   "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
              {"role": "tool", "content": '{"temp": 20}', "tool_call_id": "abc123def", "name": "get_weather"},
              {"role": "assistant", "content": "It is 20 degrees."}],
}
TOOLS = {"tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                     "parameters": {"type": "object",
                                                                    "properties": {"city": {"type": "string"}}}}}]}


def _as_template_sees(msgs: list[dict]) -> list[dict]:
    """A record's messages as sftlab hands them to a template (reasoning under both names templates read)."""
    return [{**m, "thinking": m["reasoning_content"]} if "reasoning_content" in m else m for m in msgs]


@pytest.fixture(scope="module")
def base_tokenizer():
    from sftlab.models import load_tokenizer

    return load_tokenizer("default")


def _tokenizer_for(base, source: str):
    import copy

    tok = copy.deepcopy(base)
    markers = sorted({m for m in MARKERS.findall(source) if m not in tok.get_added_vocab()})
    if markers:
        tok.add_special_tokens({"additional_special_tokens": markers}, replace_extra_special_tokens=False)
    return tok


def _lcp(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _oracle(tok, source: str, msgs: list[dict], tools=None) -> list[tuple[str, str]] | str:
    """Per assistant turn (inference prompt, truth), or the reason there is no truth.

    The turn rendered last continues its prompt: the truth is what it adds. Otherwise the template renders the
    context differently at inference (a system prompt moved into the last user turn): the assistant's own
    segment comes from the conversation without its system message (render(msgs[:k+1]) minus render(msgs[:k])),
    less the part of the generation header it shares; a header that opens a reasoning block (`<think>`) is
    followed by the record's reasoning through `</think>`, or by an empty block's close."""
    from jinja2.exceptions import TemplateError as JinjaError

    def render(m, gen=False):
        return tok.apply_chat_template(_as_template_sees(m), chat_template=source, tools=tools, tokenize=False,
                                       add_generation_prompt=gen)

    out = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        try:
            prompt, turn = render(msgs[:k], True), render(msgs[:k + 1])
            if turn.startswith(prompt):
                out.append((prompt, turn[len(prompt):].rstrip()))
                if _drops(m, out[-1][1]):
                    return _drops(m, out[-1][1])
                continue
            if m.get("reasoning_content") and not m["content"].startswith("<think>"):
                m = {**m, "content": "<think>\n" + m["reasoning_content"] + "\n</think>" + m["content"]}
            plain = [x for x in msgs[:k + 1] if x["role"] != "system"]
            before, seg_all, gen = render(plain[:-1]), render(plain), render(plain[:-1], True)
        except (JinjaError, TypeError) as e:
            return f"template raised: {e}"
        if not (seg_all.startswith(before) and gen.startswith(before)):
            return "turn does not continue its prompt"
        seg, header = seg_all[len(before):], gen[len(before):]
        n = _lcp(seg, header)
        tail, answer = header[n:], seg[n:]
        if tail and tail.strip() != "<think>":
            return "turn does not continue its prompt"
        if tail:
            content = m["content"]
            if content.startswith("<think>") and "</think>" in content:
                reasoning = content[len("<think>"):].removeprefix(tail[len("<think>"):])
                answer = reasoning[:reasoning.index("</think>") + len("</think>")] + answer
            else:
                answer = "\n</think>\n\n" + answer.lstrip("\n")
        out.append((prompt, answer.rstrip()))
        if _drops(m, out[-1][1]):
            return _drops(m, out[-1][1])
    return out


def _drops(m: dict, truth: str) -> str | None:
    if any(c["function"]["name"] not in truth for c in m.get("tool_calls", ())):
        return "the template drops tool calls"
    if m.get("reasoning_content") and m["reasoning_content"] not in truth:
        return "the template drops the reasoning"
    return None


def _case_ids():
    return [f"{t.name}:{c}" for t in TEMPLATES for c in CONVERSATIONS]


def _case(tmp_path, base_tokenizer, path: Path, conv: str):
    """The template's source, a tokenizer with its markers, the conversation, its tools and its data file."""
    source = path.read_text(encoding="utf-8")
    tok = _tokenizer_for(base_tokenizer, source)
    msgs = CONVERSATIONS[conv]
    tools = TOOLS["tools"] if conv == "tools" else None
    data = tmp_path / "conv.jsonl"
    data.write_text(json.dumps({"messages": msgs, **({"tools": tools} if tools else {})}) + "\n", encoding="utf-8")
    return source, tok, msgs, tools, data


@pytest.mark.parametrize("case", _case_ids())
def test_trained_tokens_are_the_ground_truth(tmp_path, base_tokenizer, case):
    from sftlab.config import DataConfig
    from sftlab.data.pipeline import iter_examples
    from sftlab.data.validate import DataError
    from sftlab.data.template import TemplateError

    name, conv = case.rsplit(":", 1)
    path = BY_NAME[name]
    source, tok, msgs, tools, data = _case(tmp_path, base_tokenizer, path, conv)
    truth = _oracle(tok, source, msgs, tools)
    opts = DataConfig(template=str(path), max_length=None)
    if isinstance(truth, str):
        with pytest.raises((DataError, TemplateError)) as e:
            list(iter_examples([data], tok, opts))
        assert name in str(e.value)
        if truth.startswith("template raised: "):
            assert truth.removeprefix("template raised: ") in str(e.value)
        return
    examples = list(iter_examples([data], tok, opts))
    found = []
    for ex in examples:
        i = 0
        while i < len(ex.labels):
            if ex.labels[i] == -100:
                i += 1
                continue
            j = i
            while j < len(ex.labels) and ex.labels[j] != -100:
                j += 1
            found.append((ex.input_ids[:i], ex.input_ids[i:j]))
            i = j
    assert len(found) == len(truth), f"{len(found)} trained spans for {len(truth)} assistant turns"
    for (prefix, span), (prompt, text) in sorted(zip(sorted(found, key=lambda f: len(f[0])), truth),
                                                 key=lambda p: len(p[1][0])):
        assert prefix == tok(prompt, add_special_tokens=False).input_ids  # what inference feeds the model
        assert tok.decode(span) == text


@pytest.mark.parametrize("case", [f"{t.name}:{c}" for t in GENERATION_TEMPLATES for c in CONVERSATIONS])
def test_generation_templates_train_what_transformers_marks(tmp_path, base_tokenizer, case):
    """`{% generation %}` templates (TRL's training variants): labels are transformers' assistant-token mask."""
    from sftlab.config import DataConfig
    from sftlab.data.pipeline import iter_examples

    name, conv = case.rsplit(":", 1)
    path = SHARED.parent / "templates" / "trl-training" / name
    source, tok, msgs, tools, data = _case(tmp_path, base_tokenizer, path, conv)
    from jinja2.exceptions import TemplateError as JinjaError
    from sftlab.data.template import TemplateError
    from sftlab.data.validate import DataError

    try:
        want = tok.apply_chat_template(_as_template_sees(msgs), chat_template=source, tools=tools, tokenize=True,
                                       return_dict=True, return_assistant_tokens_mask=True)
    except (JinjaError, TypeError) as e:
        with pytest.raises((DataError, TemplateError), match=re.escape(str(e))):
            list(iter_examples([data], tok, DataConfig(template=str(path), max_length=None)))
        return
    ex, = iter_examples([data], tok, DataConfig(template=str(path), max_length=None))
    # the same text; trained exactly where transformers marks (sftlab tokenizes the prompt alone: compare text)
    assert tok.decode(ex.input_ids) == tok.decode(want["input_ids"])
    assert _trained_text(tok, ex.input_ids, [lab != -100 for lab in ex.labels]) == \
        _trained_text(tok, want["input_ids"], want["assistant_masks"])


def _trained_text(tok, ids, mask) -> list[str]:
    spans, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    return spans + ([tok.decode(cur)] if cur else [])
