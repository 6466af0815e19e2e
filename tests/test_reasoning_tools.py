"""Reasoning traces, tool calls and content parts: rendered by the model's own template, trained as inference
generates them (assistant turns, tool-call turns included), never the tool results or schemas."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED
from test_templates import _tokenizer_for

TEMPLATES = SHARED.parent / "templates"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CALL = {"id": "abc123def", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_CONV = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": None, "reasoning_content": "Need the tool.", "tool_calls": [CALL]},
             {"role": "tool", "content": '{"temp": 20}', "tool_call_id": "abc123def", "name": "get_weather"},
             {"role": "assistant", "content": "It is 20 degrees.", "reasoning_content": "Tool says 20."}]


@pytest.fixture(scope="module")
def base_tokenizer():
    from sftlab.models import load_tokenizer

    return load_tokenizer("default")


def _spans(tok, ex) -> list[str]:
    spans, cur = [], []
    for t, lab in zip(ex.input_ids, ex.labels):
        if lab != -100:
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    return spans + ([tok.decode(cur)] if cur else [])


def _examples(tmp_path, tok, template, records, **opts):
    from sftlab.config import DataConfig
    from sftlab.data.pipeline import iter_examples

    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return list(iter_examples([path], tok, DataConfig(template=str(template), max_length=None, **opts)))


def _truth(tok, source, msgs, k, tools=None):
    """What the template renders for assistant message k after its own inference prompt (transformers)."""
    prompt = tok.apply_chat_template(msgs[:k], chat_template=source, tools=tools, tokenize=False,
                                     add_generation_prompt=True)
    turn = tok.apply_chat_template(msgs[:k + 1], chat_template=source, tools=tools, tokenize=False)
    assert turn.startswith(prompt)
    return turn[len(prompt):].rstrip()


def _openai(msgs):
    """The conversation as a template receives it (content None -> "", reasoning under both names)."""
    out = []
    for m in msgs:
        m = {**m, "content": m["content"] or ""}
        if "reasoning_content" in m:
            m["thinking"] = m["reasoning_content"]
        out.append(m)
    return out


@pytest.mark.parametrize("name", ["qwen3.jinja", "glm-4.5-moe.jinja"])
def test_tool_calls_and_reasoning_are_trained_tool_results_are_not(tmp_path, base_tokenizer, name):
    source = (TEMPLATES / name).read_text(encoding="utf-8")
    tok = _tokenizer_for(base_tokenizer, source)
    ex, = _examples(tmp_path, tok, TEMPLATES / name, [{"messages": TOOL_CONV, "tools": TOOLS}])
    msgs = _openai(TOOL_CONV)
    assert _spans(tok, ex) == [_truth(tok, source, msgs, 1, TOOLS), _truth(tok, source, msgs, 3, TOOLS)]
    text = tok.decode(ex.input_ids)
    assert "get_weather" in text.split(_spans(tok, ex)[0])[0]  # the schema is in the (untrained) prompt
    assert '{"temp": 20}' not in "".join(_spans(tok, ex))  # the tool result is context
    assert "Need the tool." in _spans(tok, ex)[0] and "Tool says 20." in _spans(tok, ex)[1]


def test_train_reasoning_false_keeps_the_trace_as_context(tmp_path, base_tokenizer):
    name = "qwen3.jinja"
    tok = _tokenizer_for(base_tokenizer, (TEMPLATES / name).read_text(encoding="utf-8"))
    ex, = _examples(tmp_path, tok, TEMPLATES / name, [{"messages": TOOL_CONV, "tools": TOOLS}],
                    train_reasoning=False)
    first, second = _spans(tok, ex)
    assert "Need the tool." not in first and "<tool_call>" in first and first.endswith("<|im_end|>")
    assert second == "\n\nIt is 20 degrees.<|im_end|>"
    assert "Tool says 20." in tok.decode(ex.input_ids)  # still in the context


def test_data_tools_file_applies_to_records_without_their_own(tmp_path, base_tokenizer):
    name = "qwen3.jinja"
    tok = _tokenizer_for(base_tokenizer, (TEMPLATES / name).read_text(encoding="utf-8"))
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS), encoding="utf-8")
    ex, = _examples(tmp_path, tok, TEMPLATES / name, [{"messages": TOOL_CONV[:2]}], tools=str(tools))
    assert '"name": "get_weather", "description": "Weather of a city"' in tok.decode(ex.input_ids)


def test_reasoning_inline_in_content_follows_the_template(tmp_path, base_tokenizer):
    """Qwen3 keeps the last turn's <think> block and drops earlier ones: each turn in its own context."""
    name = "qwen3.jinja"
    source = (TEMPLATES / name).read_text(encoding="utf-8")
    tok = _tokenizer_for(base_tokenizer, source)
    msgs = [{"role": "user", "content": "3*4?"}, {"role": "assistant", "content": "<think>\nfours\n</think>\n\n12"},
            {"role": "user", "content": "5*5?"}, {"role": "assistant", "content": "<think>\nfives\n</think>\n\n25"}]
    examples = _examples(tmp_path, tok, TEMPLATES / name, [{"messages": msgs}])
    assert sorted(s for ex in examples for s in _spans(tok, ex)) == sorted(
        [_truth(tok, source, msgs, 1), _truth(tok, source, msgs, 3)])
    assert any("fours" not in tok.decode(ex.input_ids) and "fives" in tok.decode(ex.input_ids) for ex in examples)


def test_prompt_that_opens_a_reasoning_block_trains_reasoning_close_and_answer(tmp_path, base_tokenizer):
    """DeepSeek-R1's prompt ends with `<think>\\n`: the record's reasoning, `</think>`, the answer, the end of
    the turn; a record without reasoning gets an empty block's close."""
    name = "deepseek-r1-distill-qwen.jinja"
    tok = _tokenizer_for(base_tokenizer, (TEMPLATES / name).read_text(encoding="utf-8"))
    with_trace = {"messages": [{"role": "user", "content": "3*4?"},
                               {"role": "assistant", "content": "<think>\nThree fours.\n</think>\n\n12"}]}
    field = {"messages": [{"role": "user", "content": "3*4?"},
                          {"role": "assistant", "content": "12", "reasoning_content": "Three fours."}]}
    plain = {"messages": [{"role": "user", "content": "3*4?"}, {"role": "assistant", "content": "12"}]}
    got = [_spans(tok, ex) for ex in _examples(tmp_path, tok, TEMPLATES / name, [with_trace, field, plain])]
    assert got == [["Three fours.\n</think>\n\n12<｜end▁of▁sentence｜>"],
                   ["Three fours.\n</think>12<｜end▁of▁sentence｜>"],
                   ["\n</think>\n\n12<｜end▁of▁sentence｜>"]]
    ex = _examples(tmp_path, tok, TEMPLATES / name, [plain])[0]
    assert tok.decode(ex.input_ids).count("<think>\n") == 1  # the prompt's own opening tag, untrained


def test_template_without_tool_or_reasoning_support_is_an_error(tmp_path, base_tokenizer):
    from sftlab.data.validate import DataError

    tok = base_tokenizer
    with pytest.raises(DataError, match="does not render the tool calls of assistant message 1"):
        _examples(tmp_path, tok, TEMPLATES / "smollm2.jinja", [{"messages": TOOL_CONV[:2]}])
    with pytest.raises(DataError, match=r"does not render the reasoning of assistant message 1"):
        _examples(tmp_path, tok, TEMPLATES / "smollm2.jinja",
                  [{"messages": [{"role": "user", "content": "x"},
                                 {"role": "assistant", "content": "y", "reasoning_content": "because"}]}])


def test_content_parts_and_sharegpt_function_calls(tmp_path, base_tokenizer):
    from sftlab.data.formats import to_conversation
    from sftlab.data.validate import DataError, Location

    where = Location("f.jsonl", 1)
    conv = to_conversation({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                       {"type": "text", "text": "b"}]},
                                         {"role": "assistant", "content": "c"}]}, where, "messages")
    assert conv.messages[0].content == "a\nb"
    with pytest.raises(DataError, match=r"messages\[0\].content\[1\] is a 'image_url' content part"):
        to_conversation({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                    {"type": "image_url", "image_url": {}}]},
                                      {"role": "assistant", "content": "c"}]}, where, "messages")
    conv = to_conversation({"conversations": [
        {"from": "human", "value": "Weather?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "20"}, {"from": "gpt", "value": "20 degrees."}]}, where, "sharegpt")
    assert [m.role for m in conv.messages] == ["user", "assistant", "tool", "assistant"]
    assert conv.messages[1].tool_calls == [{"type": "function",
                                            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    tok = _tokenizer_for(base_tokenizer, (TEMPLATES / "qwen3.jinja").read_text(encoding="utf-8"))
    sharegpt = {"conversations": [{"from": "human", "value": "Weather?"},
                                  {"from": "function_call", "value": json.dumps(
                                      {"name": "get_weather", "arguments": {"city": "Paris"}})},
                                  {"from": "observation", "value": "20"}, {"from": "gpt", "value": "20 degrees."}],
                "tools": TOOLS}
    examples = _examples(tmp_path, tok, TEMPLATES / "qwen3.jinja", [sharegpt])  # Qwen3: one per turn here
    first, second = sorted((s for ex in examples for s in _spans(tok, ex)), key=lambda s: "tool_call" not in s)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in first
    assert second.endswith("20 degrees.<|im_end|>") and "20\n" not in second


def test_data_inspect_and_tokenize_report_reasoning_tools_and_history_rewrites(tmp_path, base_tokenizer):
    """The acceptance command: `sftlab data tokenize CONV --model default --template FILE` gives the truth spans;
    `data inspect --json` counts reasoning and tool-call turns and what history rewrites cost."""
    from typer.testing import CliRunner
    from sftlab.cli import app

    data = tmp_path / "conv.jsonl"
    multi = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "one"},
             {"role": "user", "content": "2"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\ntwo"}]
    data.write_text(json.dumps({"messages": TOOL_CONV, "tools": TOOLS}) + "\n" + json.dumps({"messages": multi})
                    + "\n", encoding="utf-8")
    template = TEMPLATES / "qwen3.jinja"
    runner = CliRunner()
    res = runner.invoke(app, ["data", "inspect", str(data), "--model", "default", "--template", str(template),
                              "--max-length", "4096", "--json"])
    assert res.exit_code == 0, res.output
    stats = json.loads(res.stdout[res.stdout.index("{"):res.stdout.rindex("}") + 1])
    assert stats["reasoning_turns"] == 3 and stats["tool_call_turns"] == 1
    assert stats["history_rewrites"]["conversations"] == 1 and stats["history_rewrites"]["extra_examples"] == 1
    assert stats["history_rewrites"]["extra_tokens"] > 0
    out = tmp_path / "tok.jsonl"
    res = runner.invoke(app, ["data", "tokenize", str(data), "--model", "default", "--template", str(template),
                              "--max-length", "4096", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3  # the tool conversation in one example, the rewritten one in two
    trained = [base_tokenizer.decode([t for t, lab in zip(r["input_ids"], r["labels"]) if lab != -100]) for r in rows]
    assert any(t.endswith("hm\n</think>\n\ntwo<|im_end|>") for t in trained), trained
    assert any(t.endswith("one<|im_end|>") and "hm" not in t for t in trained), trained
