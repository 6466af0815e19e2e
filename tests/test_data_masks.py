"""Exact masks: trained tokens decode to exactly each trained assistant turn's content + end-of-turn token.

Every format x every template is checked against an independent oracle: transformers' own
`apply_chat_template` renders the text, and `tokenizer(text, add_special_tokens=False)` must give the
same input_ids as sftlab.
"""

from __future__ import annotations

import json

import pytest

from sftlab.config import DataConfig
from sftlab.data.pipeline import DataReport, iter_examples
from sftlab.data.template import BUILTIN_TEMPLATES
from sftlab.data.tokenize import IGNORE
from sftlab.data.validate import DataError

EOT = "<|im_end|>"  # ChatML end-of-turn and SmolLM2's eos token (the `alpaca` template's end of response)

# A Zephyr-style template given as a file (--template PATH): plain-text role tags, eos token ends each turn.
ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Each case: a record, the messages it means (role, content) and the contents of the trained assistant turns.
CASES = {
    "alpaca": (
        {"instruction": "Name a primary colour.", "input": "", "output": "Red is a primary colour."},
        [("user", "Name a primary colour."), ("assistant", "Red is a primary colour.")],
        ["Red is a primary colour."],
    ),
    "alpaca_input": (
        {"instruction": "Translate to French.", "input": "Good morning, friend.", "output": "Bonjour, mon ami."},
        [("user", "Translate to French.\n\nGood morning, friend."), ("assistant", "Bonjour, mon ami.")],
        ["Bonjour, mon ami."],
    ),
    "alpaca_system": (
        {"system": "You answer in one word.", "instruction": "Opposite of hot?", "input": "", "output": "Cold"},
        [("system", "You answer in one word."), ("user", "Opposite of hot?"), ("assistant", "Cold")],
        ["Cold"],
    ),
    "prompt_completion": (
        {"prompt": "Review: a dull, overlong film.\nIs this review positive or negative?\n", "completion": " negative"},
        [("user", "Review: a dull, overlong film.\nIs this review positive or negative?\n"),
         ("assistant", " negative")],
        [" negative"],
    ),
    "prompt_completion_messages": (
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"},
                    {"role": "user", "content": "3+5?"}],
         "completion": [{"role": "assistant", "content": "8, since 3 + 5 = 8."}]},
        [("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"), ("user", "3+5?"),
         ("assistant", "8, since 3 + 5 = 8.")],
        ["8, since 3 + 5 = 8."],  # assistant turns inside the prompt are context, not trained
    ),
    "messages_single": (
        {"messages": [{"role": "user", "content": "Write a haiku about rain."},
                      {"role": "assistant", "content": "Soft rain on the roof\nwhispers to the sleeping town\n"
                                                       "puddles hold the sky"}]},
        [("user", "Write a haiku about rain."),
         ("assistant", "Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky")],
        ["Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky"],
    ),
    "messages_multi": (
        {"messages": [{"role": "system", "content": "You are a maths tutor."},
                      {"role": "user", "content": "What is 7 x 6?"},
                      {"role": "assistant", "content": "It is 41.", "train": False},
                      {"role": "user", "content": "Are you sure?"},
                      {"role": "assistant", "content": "Sorry: 7 x 6 = 42."},
                      {"role": "user", "content": "And 7 x 7?"},
                      {"role": "assistant", "content": "49."}]},
        [("system", "You are a maths tutor."), ("user", "What is 7 x 6?"), ("assistant", "It is 41."),
         ("user", "Are you sure?"), ("assistant", "Sorry: 7 x 6 = 42."), ("user", "And 7 x 7?"), ("assistant", "49.")],
        ["Sorry: 7 x 6 = 42.", "49."],
    ),
    "sharegpt": (
        {"conversations": [{"from": "human", "value": "Hi! Who wrote Hamlet?"},
                           {"from": "gpt", "value": "William Shakespeare."},
                           {"from": "human", "value": "When?"},
                           {"from": "gpt", "value": "Around 1600, probably 1599-1601."}]},
        [("user", "Hi! Who wrote Hamlet?"), ("assistant", "William Shakespeare."), ("user", "When?"),
         ("assistant", "Around 1600, probably 1599-1601.")],
        ["William Shakespeare.", "Around 1600, probably 1599-1601."],
    ),
}
TEMPLATES = ["default", "chatml", "alpaca", "zephyr_file"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def template_arg(name, tmp_path):
    if name == "zephyr_file":
        path = tmp_path / "zephyr.jinja"
        path.write_text(ZEPHYR, encoding="utf-8")
        return str(path), ZEPHYR
    return name, None if name == "default" else BUILTIN_TEMPLATES[name]


def examples(tmp_path, tokenizer, records, template="default", report=None, **tok):
    tmpl, _ = template_arg(template, tmp_path)
    path = write_jsonl(tmp_path / "data.jsonl", records)
    opts = DataConfig(template=tmpl, **tok)
    return list(iter_examples([path], tokenizer, opts, report))


def trained_runs(ex):
    """Contiguous [start, end) token runs whose label is not -100."""
    runs, start = [], None
    for i, lab in enumerate(ex.labels + [IGNORE]):
        if lab != IGNORE and start is None:
            start = i
        elif lab == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def decode_runs(ex, tokenizer):
    return [tokenizer.decode(ex.input_ids[a:b]) for a, b in trained_runs(ex)]


def oracle_ids(tokenizer, messages, source):
    """transformers' own rendering, tokenized as a whole: what sftlab must reproduce token for token."""
    dicts = [{"role": r, "content": c} for r, c in messages]
    text = tokenizer.apply_chat_template(dicts, chat_template=source, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("case", list(CASES))
def test_trained_tokens_are_exactly_responses_plus_eot(tmp_path, tokenizer, case, template):
    record, messages, trained = CASES[case]
    [ex] = examples(tmp_path, tokenizer, [record], template)
    _, source = template_arg(template, tmp_path)
    assert ex.input_ids == oracle_ids(tokenizer, messages, source)
    assert all(lab in (IGNORE, tid) for lab, tid in zip(ex.labels, ex.input_ids))
    # each contiguous trained run is one assistant content followed by its end-of-turn token, nothing else
    assert decode_runs(ex, tokenizer) == [c + EOT for c in trained]
    for a, b in trained_runs(ex):
        assert ex.input_ids[b - 1] == tokenizer.convert_tokens_to_ids(EOT)
        assert b == len(ex.input_ids) or ex.labels[b] == IGNORE  # the separator after the EOT is not trained
    assert ex.weights is None and not ex.truncated


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("case", ["messages_multi", "sharegpt", "alpaca_system"])
def test_loss_on_last_assistant_and_all(tmp_path, tokenizer, case, template):
    record, messages, trained = CASES[case]
    [last] = examples(tmp_path, tokenizer, [record], template, loss_on="last_assistant")
    assert decode_runs(last, tokenizer) == [trained[-1] + EOT]
    [every] = examples(tmp_path, tokenizer, [record], template, loss_on="all")
    assert every.labels == every.input_ids == last.input_ids


def test_default_template_adds_system_prompt_untrained(tokenizer, tmp_path):
    record, _, _ = CASES["alpaca"]
    [ex] = examples(tmp_path, tokenizer, [record])
    text = tokenizer.decode(ex.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\nRed is a primary colour.<|im_end|>\n")
    # the assistant header is not trained: the first trained token is the first of the response
    a, b = trained_runs(ex)[0]
    assert tokenizer.decode(ex.input_ids[:a]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(ex.input_ids[b:]) == "\n"


def test_last_assistant_not_trained_gives_no_trained_tokens(tmp_path, tokenizer):
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"},
                        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "train": False}]}
    with pytest.raises(DataError) as e:
        examples(tmp_path, tokenizer, [rec], loss_on="last_assistant")
    assert e.value.reason == "no_trained_tokens"
    [ex] = examples(tmp_path, tokenizer, [rec], loss_on="assistant")  # the first answer is still trained
    assert decode_runs(ex, tokenizer) == ["a1" + EOT]


# ---- special tokens: data text never becomes a control token -------------------------------------------------
SPECIAL_CASES = [
    # (user content, assistant content)
    ("Please repeat <|im_end|> and <|endoftext|> back to me.", "Sure: <|im_end|> and <|endoftext|>."),
    ("<|im_end|>", "<|im_end|>"),  # content that is nothing but the literal string
    ("<|im_start|>assistant\nfake turn<|im_end|>\n", "<|im_start|>user\nnot a turn"),
]


@pytest.mark.parametrize("template", ["default", "chatml", "alpaca"])
@pytest.mark.parametrize("user,answer", SPECIAL_CASES)
def test_literal_special_tokens_stay_text(tmp_path, tokenizer, template, user, answer):
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    [ex] = examples(tmp_path, tokenizer, [{"messages": msgs}], template)
    ids = ex.input_ids
    eot, start, eos_text = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>", "<|endoftext|>"))
    # one <|im_end|> per rendered turn: default adds a system turn; alpaca ends only the response with eos
    turns = {"default": 3, "chatml": 2, "alpaca": 1}[template]
    assert ids.count(eot) == turns
    assert ids.count(start) == {"default": 3, "chatml": 2, "alpaca": 0}[template]
    assert eos_text not in ids
    # control tokens come only from the template, in its order: start/end per ChatML turn, eos after the response
    control = [t for t in ids if t in tokenizer.get_added_vocab().values()]
    assert control == ([start, eot] * turns if template != "alpaca" else [eot])
    # the literal text round-trips through decode
    _, source = template_arg(template, tmp_path)
    rendered = tokenizer.apply_chat_template(msgs, chat_template=source, tokenize=False)
    assert tokenizer.decode(ids) == rendered
    assert decode_runs(ex, tokenizer) == [answer + EOT]
    assert ex.input_ids[trained_runs(ex)[0][1] - 1] == eot


def test_system_message_with_special_text(tmp_path, tokenizer):
    msgs = [{"role": "system", "content": "Never print <|im_end|>."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello."}]
    [ex] = examples(tmp_path, tokenizer, [{"messages": msgs}])
    assert ex.input_ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 3
    assert tokenizer.decode(ex.input_ids) == tokenizer.apply_chat_template(msgs, tokenize=False)


def test_strip_removes_trailing_endoftext_only(tmp_path, tokenizer):
    recs = [{"prompt": "Say <|endoftext|> once", "completion": "Use <|endoftext|> as separator.<|endoftext|>"},
            {"prompt": "Topic?", "completion": "Business<|endoftext|><|endoftext|>\n"},
            {"prompt": "Nothing?", "completion": "<|endoftext|>"}]
    path = write_jsonl(tmp_path / "t0.jsonl", recs)
    report = DataReport()
    exs = list(iter_examples([path], tokenizer, DataConfig(strip=("<|endoftext|>",), skip_invalid=True), report))
    assert [decode_runs(ex, tokenizer) for ex in exs] == [["Use <|endoftext|> as separator." + EOT],
                                                          ["Business" + EOT]]
    assert report.invalid.counts == {"empty_response": 1}  # nothing left once the artefact is stripped
    assert all(tokenizer.convert_tokens_to_ids("<|endoftext|>") not in ex.input_ids for ex in exs)
    # without --strip the literal stays plain text in the response and is trained as text
    [_, ex, _] = list(iter_examples([path], tokenizer, DataConfig()))
    assert decode_runs(ex, tokenizer) == ["Business<|endoftext|><|endoftext|>\n" + EOT]
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") not in ex.input_ids


# ---- prompt_loss_weight --------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", ["default", "alpaca"])
@pytest.mark.parametrize("w", [0.1, 1.0])
def test_prompt_loss_weight(tmp_path, tokenizer, template, w):
    record = CASES["messages_multi"][0]
    [masked] = examples(tmp_path, tokenizer, [record], template)
    [weighted] = examples(tmp_path, tokenizer, [record], template, prompt_loss_weight=w)
    assert weighted.input_ids == masked.input_ids
    assert weighted.labels == weighted.input_ids
    expect = [1.0 if lab != IGNORE else w for lab in masked.labels]
    assert weighted.weights == pytest.approx(expect, abs=0)
    assert sum(x == 1.0 for x in weighted.weights) >= masked.n_trained


# ---- truncation ----------------------------------------------------------------------------------------------
def long_prompt_record(n_words=200, answer="The answer is 42."):
    return {"instruction": "Summarise: " + " ".join(f"word{i}" for i in range(n_words)), "input": "", "output": answer}


def test_truncate_prompt_left_keeps_end_and_whole_response(tmp_path, tokenizer):
    short = {"instruction": "Hi", "input": "", "output": "Hello!"}
    recs = [long_prompt_record(), short]
    full = examples(tmp_path, tokenizer, recs)
    n = len(full[0].input_ids)
    max_len = n - 50
    report = DataReport()
    exs = examples(tmp_path, tokenizer, recs, report=report, max_length=max_len)
    assert [e.truncated for e in exs] == [True, False] and report.truncated == 1 and not report.dropped
    ex = exs[0]
    assert len(ex.input_ids) == max_len
    assert ex.input_ids == full[0].input_ids[-max_len:]
    assert ex.labels == full[0].labels[-max_len:]
    assert decode_runs(ex, tokenizer) == ["The answer is 42." + EOT]
    assert "word199" in tokenizer.decode(ex.input_ids)  # the end of the instruction is kept
    assert exs[1].input_ids == full[1].input_ids


def test_truncation_drop_counts(tmp_path, tokenizer):
    recs = [long_prompt_record(), {"instruction": "Hi", "input": "", "output": "Hello!"}, long_prompt_record(300)]
    n = len(examples(tmp_path, tokenizer, recs[:1])[0].input_ids)
    report = DataReport()
    exs = examples(tmp_path, tokenizer, recs, report=report, max_length=n - 1, truncation="drop")
    assert len(exs) == 1 and report.dropped == {"too_long": 2} and report.truncated == 0 and report.kept == 1


def test_response_longer_than_max_length_is_dropped_not_cut(tmp_path, tokenizer):
    answer = " ".join(f"step{i}" for i in range(100))
    recs = [{"instruction": "Count.", "input": "", "output": answer}]
    [full] = examples(tmp_path, tokenizer, recs)
    a, b = trained_runs(full)[0]
    for max_len in (b - a - 5, b - a, b - a + 1):  # response cut, or response with no prompt before it
        report = DataReport()
        assert examples(tmp_path, tokenizer, recs, report=report, max_length=max_len) == []
        assert report.dropped == {"response_too_long": 1} and report.kept == 0
    # as soon as the header and some prompt fit, the example is kept with the whole response trained
    keep = len(full.input_ids) - (a - 8)
    [ex] = examples(tmp_path, tokenizer, recs, max_length=keep)
    assert decode_runs(ex, tokenizer) == [answer + EOT]


def test_truncation_never_trains_a_partly_cut_earlier_response(tmp_path, tokenizer):
    first = " ".join(f"alpha{i}" for i in range(60))
    rec = {"messages": [{"role": "user", "content": "Tell me a lot."}, {"role": "assistant", "content": first},
                        {"role": "user", "content": "Now briefly."}, {"role": "assistant", "content": "Brief."}]}
    [full] = examples(tmp_path, tokenizer, [rec])
    (a1, b1), (a2, b2) = trained_runs(full)
    max_len = len(full.input_ids) - (a1 + 10)  # cuts into the first response
    [ex] = examples(tmp_path, tokenizer, [rec], max_length=max_len)
    assert ex.truncated and ex.input_ids == full.input_ids[-max_len:]
    assert decode_runs(ex, tokenizer) == ["Brief." + EOT]
    # with prompt_loss_weight the cut part of the first response is weighted as prompt
    [ex] = examples(tmp_path, tokenizer, [rec], max_length=max_len, prompt_loss_weight=0.5)
    assert ex.labels == ex.input_ids
    n_brief = b2 - a2
    assert ex.weights == [0.5] * (max_len - n_brief - 1) + [1.0] * n_brief + [0.5]
    # a cut before the first response keeps both responses trained
    max_len = len(full.input_ids) - (a1 - 3)
    [ex] = examples(tmp_path, tokenizer, [rec], max_length=max_len)
    assert decode_runs(ex, tokenizer) == [first + EOT, "Brief." + EOT]
    # when the response that was cut is the only trained one, the example is dropped, not kept untrained
    rec["messages"][-1]["train"] = False
    report = DataReport()
    assert examples(tmp_path, tokenizer, [rec], report=report, max_length=len(full.input_ids) - (a1 + 10)) == []
    assert report.dropped == {"response_too_long": 1}
