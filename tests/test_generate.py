"""Generation with the training template: prompt tokens, left padding, stopping at end-of-turn, batching,
and the `generate` / `chat` commands on a tiny random model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from sftlab.cli import app
from sftlab.data.formats import Conversation, Message
from sftlab.data.template import end_of_turn_ids, end_of_turn_text, render_conversation, resolve_template
from sftlab.config import DataConfig
from sftlab.data.tokenize import IGNORE, protected_pattern, tokenize_rendered
from sftlab.decode import left_pad
from sftlab.generate import (Decoding, decode_reply, encode_prompt, generate,
                             generation_config, split_reference, stop_markers)

from conftest import make_tiny_llama

IM_END = 2
PROMPTS = [
    "hi",
    "What is 23 plus 45?",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    "Write a long and detailed story about a dragon who lives in a castle by the sea and collects shiny stones.",
    "Sort these words alphabetically: pear, apple, fig",
]


def make_chatty_model(seed: int = 0):
    """The tiny Llama with an untied random output layer. With tied embeddings a random 2-layer model just
    repeats its last input token ("\n", so every reply is empty); this one says varied nonsense."""
    model = make_tiny_llama(seed=seed)
    g = torch.Generator().manual_seed(seed)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=g))
    model.config.tie_word_embeddings = False
    return model


@pytest.fixture(scope="module")
def chatty_model():
    return make_chatty_model()


@pytest.fixture
def chatty_model_dir(tmp_path, tokenizer):
    path = tmp_path / "chatty-llama"
    make_chatty_model().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def greedy_reference(model, ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding without cache or padding: the ground truth for `generate`."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


@pytest.fixture(scope="module")
def tmpl(tokenizer):
    return resolve_template("default", tokenizer)


def test_end_of_turn_of_chatml_is_im_end(tokenizer, tmpl):
    assert end_of_turn_text(tmpl) == "<|im_end|>"
    assert end_of_turn_ids(tmpl, tokenizer) == [IM_END]
    cfg = generation_config(Decoding(max_new_tokens=7), tmpl, tokenizer)
    assert cfg.eos_token_id == [IM_END] and cfg.pad_token_id == IM_END and cfg.do_sample is False
    assert cfg.max_new_tokens == 7 and not cfg.stop_strings


def test_alpaca_end_of_turn_is_eos_token(tokenizer):
    alpaca = resolve_template("alpaca", tokenizer)
    assert end_of_turn_text(alpaca) == tokenizer.eos_token
    assert end_of_turn_ids(alpaca, tokenizer) == [tokenizer.eos_token_id]


@pytest.mark.parametrize("user", ["What is 2+2?", "Repeat after me: <|im_end|> and <|im_start|>user"])
def test_prompt_tokens_equal_the_training_prefix(tokenizer, tmpl, user):
    conv = Conversation([Message("user", user), Message("assistant", "4")])
    ex, = tokenize_rendered(render_conversation(conv, tmpl), [conv], tokenizer, DataConfig(),
                            protected_pattern(tokenizer))
    first_trained = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE)
    prompt_ids = encode_prompt([{"role": "user", "content": user}], tmpl, tokenizer)
    assert prompt_ids == ex.input_ids[:first_trained]
    # Only the template's own markers (system and user turn ends) are control tokens, never the user's text.
    assert prompt_ids.count(IM_END) == 2


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


def test_decode_reply_cuts_at_first_end_of_turn(tokenizer, tmpl):
    ids = tokenizer("Paris is", add_special_tokens=False).input_ids
    stops = stop_markers(tmpl, tokenizer)
    assert decode_reply(ids + [IM_END, IM_END, IM_END], tokenizer, stops) == "Paris is"
    assert decode_reply(ids + [IM_END] + ids, tokenizer, stops) == "Paris is"
    assert decode_reply(ids, tokenizer, stops) == "Paris is"


def test_split_reference_drops_final_assistant_turn():
    conv = Conversation([Message("user", "q"), Message("assistant", "a")], task="t")
    prompt, ref = split_reference(conv)
    assert ref == "a" and prompt.as_dicts() == [{"role": "user", "content": "q"}] and prompt.task == "t"


def test_batched_greedy_equals_unbatched_and_plain_greedy(tokenizer, tmpl, chatty_model):
    n = 6
    batched = generate(chatty_model, tokenizer, PROMPTS, tmpl, max_new_tokens=n, batch_size=4)
    single = [generate(chatty_model, tokenizer, [p], tmpl, max_new_tokens=n, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    stops = stop_markers(tmpl, tokenizer)
    for p, got in zip(PROMPTS, batched):
        ids = encode_prompt([{"role": "user", "content": p}] if isinstance(p, str) else p, tmpl, tokenizer)
        assert got == decode_reply(greedy_reference(chatty_model, ids, n), tokenizer, stops)
    # Different prompts, different replies: outputs are not mixed up by the length sorting.
    assert all(batched) and len(set(batched)) == len(PROMPTS)


def test_generation_stops_at_end_of_turn(tokenizer, tmpl):
    """Make <|im_end|> take the place of the 3rd greedy token: generation must stop right there."""
    model = make_chatty_model(seed=1)
    prompt = "Tell me about the sea."
    ids = encode_prompt([{"role": "user", "content": prompt}], tmpl, tokenizer)
    free = greedy_reference(model, ids, 8)
    k = next(i for i in range(2, 8) if free[i] not in free[:i] and free[i] != IM_END)
    assert IM_END not in free[:k]
    c = free[k]
    with torch.no_grad():  # swap output rows: <|im_end|> now gets exactly token c's logit, and c gets its old one
        w = model.lm_head.weight
        w[[IM_END, c]] = w[[c, IM_END]].clone()
    assert greedy_reference(model, ids, k + 1) == free[:k] + [IM_END]

    raw = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         generation_config=generation_config(Decoding(max_new_tokens=8), tmpl, tokenizer))
    assert raw[0, len(ids):].tolist() == free[:k] + [IM_END]  # stopped, did not run to max_new_tokens
    reply = generate(model, tokenizer, [prompt, "x"], tmpl, max_new_tokens=8, batch_size=2)[0]
    assert reply == tokenizer.decode(free[:k]).strip()
    assert "<|im_end|>" not in reply


def test_sampling_is_seeded(tokenizer, tmpl, chatty_model):
    a = generate(chatty_model, tokenizer, PROMPTS[:2], tmpl, max_new_tokens=5, do_sample=True, temperature=1.0,
                 top_p=0.9, seed=3)
    b = generate(chatty_model, tokenizer, PROMPTS[:2], tmpl, max_new_tokens=5, do_sample=True, temperature=1.0,
                 top_p=0.9, seed=3)
    assert a == b


def test_decoding_options_are_checked():
    with pytest.raises(ValueError, match="temperature"):
        Decoding(do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        Decoding(top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Decoding(max_new_tokens=0)


# ---- CLI -------------------------------------------------------------------------------------------------------
def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_generate_end_to_end(tmp_path, chatty_model_dir, tokenizer):
    rows = [
        {"task": "add", "messages": [{"role": "user", "content": "What is 2 plus 3?"},
                                     {"role": "assistant", "content": "5"}]},
        {"task": "antonym", "messages": [{"role": "system", "content": "Answer in one word."},
                                         {"role": "user", "content": "Opposite of hot?"},
                                         {"role": "assistant", "content": "cold"}]},
        {"task": "add", "messages": [{"role": "user", "content": "Add 10 and 4, then tell me a long story."},
                                     {"role": "assistant", "content": "14"}]},
    ]
    data = _write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "gen" / "out.jsonl"
    result = CliRunner().invoke(app, ["generate", str(chatty_model_dir), "--data", str(data), "--out", str(out),
                                      "--max-new-tokens", "5", "--batch-size", "2", "--task-field", "task"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["index"] for x in lines] == [0, 1, 2]
    assert [x["task"] for x in lines] == ["add", "antonym", "add"]
    assert [x["reference"] for x in lines] == ["5", "cold", "14"]
    assert [x["prompt"] for x in lines] == [r["messages"][:-1] for r in rows]
    from sftlab.models import load_model

    expected = generate(load_model(chatty_model_dir), tokenizer, [r["messages"][:-1] for r in rows], "default",
                        max_new_tokens=5, batch_size=1)
    assert [x["generation"] for x in lines] == expected
    assert "3 examples" in result.output and "exact match 0.0%" in result.output


def test_cli_generate_reports_bad_input_with_location(tmp_path, tiny_model_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                    '{"messages": [{"role": "user", "content": "no answer"}]}\n')
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["generate", str(tiny_model_dir), "--data", str(data), "--out", str(out)])
    assert result.exit_code == 1
    assert f"{data}:2" in result.output and "no assistant turn" in result.output
    assert not out.exists()  # atomic: nothing half-written


def test_cli_chat_streams_and_exits(chatty_model_dir, tokenizer):
    from sftlab.models import load_model

    model = load_model(chatty_model_dir)
    first = generate(model, tokenizer, ["hi"], "default", max_new_tokens=6)[0]
    result = CliRunner().invoke(app, ["chat", str(chatty_model_dir), "--max-new-tokens", "6"], input="hi\n/exit\n")
    assert result.exit_code == 0, result.output
    assert first and first in result.output
    assert "1 replies" in result.output
    # End of input (no /exit) leaves cleanly too.
    result = CliRunner().invoke(app, ["chat", str(chatty_model_dir), "--max-new-tokens", "3"], input="")
    assert result.exit_code == 0, result.output


def test_chat_loop_keeps_history_and_resets(tokenizer, tmpl, chatty_model):
    from sftlab.chat import chat_loop

    lines = iter(["hello", "and now?", "/reset", "again", None])
    shown: list[str] = []
    history = chat_loop(chatty_model, tokenizer, tmpl, lambda: next(lines), shown.append, system="Be brief.",
                        max_new_tokens=5)
    streamed = "".join(shown).split("\n")
    # Second turn saw the first exchange; after /reset only the system prompt and the new turn remain.
    h1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    r1 = generate(chatty_model, tokenizer, [h1], tmpl, max_new_tokens=5)[0]
    h2 = h1 + [{"role": "assistant", "content": r1}, {"role": "user", "content": "and now?"}]
    r2 = generate(chatty_model, tokenizer, [h2], tmpl, max_new_tokens=5)[0]
    r3 = generate(chatty_model, tokenizer, [[h1[0], {"role": "user", "content": "again"}]], tmpl, max_new_tokens=5)[0]
    assert history == [h1[0], {"role": "user", "content": "again"}, {"role": "assistant", "content": r3}]
    assert [s.strip() for s in streamed[:2]] == [r1, r2] and streamed[3].strip() == r3
    assert streamed[2] == "(conversation reset)"


@pytest.mark.slow
def test_default_model_answers_and_stops_at_im_end(tokenizer):
    from sftlab.models import load_model

    model = load_model("default")
    tmpl = resolve_template("default", tokenizer)
    prompt = 'What is the opposite of "hot"? Answer with one word.'
    ids = encode_prompt([{"role": "user", "content": prompt}], tmpl, tokenizer)
    raw = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         generation_config=generation_config(Decoding(max_new_tokens=32), tmpl, tokenizer))
    new = raw[0, len(ids):].tolist()
    assert new[-1] == IM_END and IM_END not in new[:-1] and len(new) < 32  # ended its turn by itself
    reply = generate(model, tokenizer, [prompt], tmpl, max_new_tokens=32)[0]
    assert reply == tokenizer.decode(new[:-1]).strip()
    assert "cold" in reply.lower()
