"""The decode loop (`sftlab.decode`): continuous batching over a growing KV cache gives every prompt the tokens
transformers' greedy `generate` gives it alone, whatever joins or leaves the batch around it."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from sftlab.decode import GrowingLayer, Sampling, Stops, decode, fast_path_problem, prefill_groups
from sftlab.generate import decode_stops, encode_prompt

from test_generate import IM_END, greedy_reference, make_chatty_model

WORDS = "the sea a dragon castle stones shiny sort pear apple fig colour name brief story long".split()


def prompt_ids(tokenizer, tmpl, n: int, seed: int = 0) -> list[list[int]]:
    """n chat prompts of very different lengths (1 to 40 words)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = 1 + int(torch.randint(0, 40, (1,), generator=g)) if i % 3 else 1 + 13 * (i % 4)
        text = " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (k,), generator=g))
        out.append(encode_prompt([{"role": "user", "content": text}], tmpl, tokenizer))
    return out


def hf_alone(model, ids: list[int], n: int, stop_ids: list[int]) -> list[int]:
    """transformers' greedy `generate` of one prompt alone, no padding."""
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=stop_ids, pad_token_id=stop_ids[0])
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             generation_config=cfg)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def tmpl(tokenizer):
    from sftlab.data.template import resolve_template

    return resolve_template("default", tokenizer)


@pytest.fixture(scope="module")
def chatty():
    return make_chatty_model(seed=2).eval()


@pytest.mark.parametrize("batch_size, prefill_tokens", [(1, 4096), (3, 4096), (8, 4096), (8, 1)])
def test_continuous_batching_equals_generate_alone(tokenizer, tmpl, chatty, batch_size, prefill_tokens):
    """Twelve prompts of mixed lengths and budgets 1..15 through a batch of 1, 3 or 8: rows leave at their own
    budget, waiting prompts join mid-decode (prefilled in groups of similar length, or one by one), left padding
    is cut when the long rows are gone."""
    prompts = prompt_ids(tokenizer, tmpl, 12)
    budgets = [1 + (7 * i) % 15 for i in range(12)]
    stops = decode_stops(tmpl, tokenizer)
    finished = []
    got = decode(chatty, prompts, budgets, stops, IM_END, batch_size, on_done=finished.append,
                 prefill_tokens=prefill_tokens)
    assert sum(finished) == len(prompts)
    for ids, n, new in zip(prompts, budgets, got):
        want = hf_alone(chatty, ids, n, sorted(stops.ids))
        assert new == want
        assert new == greedy_reference(chatty, ids, len(new))  # and the model's own greedy tokens, without cache
        assert len(new) == n or new[-1] in stops.ids


def test_prefill_groups_bound_padding_and_size():
    lengths = [800, 460, 120, 100, 95, 91, 90, 40, 40, 39, 38, 30]
    assert prefill_groups(lengths, 4096) == [[0], [1], [2, 3, 4, 5, 6], [7, 8, 9, 10, 11]]
    assert prefill_groups(lengths, 200) == [[0], [1], [2], [3, 4], [5, 6], [7, 8, 9, 10, 11]]
    for max_tokens in (1, 200, 4096):
        groups = prefill_groups(lengths, max_tokens)
        assert [i for g in groups for i in g] == list(range(len(lengths)))
        for g in groups:
            assert len(g) == 1 or len(g) * lengths[g[0]] <= max_tokens
            assert 4 * lengths[g[-1]] >= 3 * lengths[g[0]]


def test_rows_stop_at_end_of_turn_and_others_go_on(tokenizer, tmpl):
    """Make <|im_end|> the 3rd greedy token of one prompt: that row ends there, its batch-mates run to budget."""
    model = make_chatty_model(seed=1).eval()
    prompts = prompt_ids(tokenizer, tmpl, 4, seed=3)
    free = greedy_reference(model, prompts[0], 8)
    c = free[2]
    with torch.no_grad():  # <|im_end|> takes token c's output row
        w = model.lm_head.weight
        w[[IM_END, c]] = w[[c, IM_END]].clone()
    stops = decode_stops(tmpl, tokenizer)
    got = decode(model, prompts, [8] * 4, stops, IM_END, batch_size=4)
    assert got[0] == free[:2] + [IM_END]
    for ids, new in zip(prompts, got):
        assert new == hf_alone(model, ids, 8, sorted(stops.ids))


def test_stop_text_of_a_multi_token_marker(tokenizer):
    marker = "### End"
    ids = tokenizer("Some answer.\n### End", add_special_tokens=False).input_ids
    assert len(tokenizer(marker, add_special_tokens=False).input_ids) > 1
    stops = Stops(frozenset(), marker, tokenizer)
    hits = [stops.hit(ids[:k]) for k in range(1, len(ids) + 1)]
    assert hits[-1] and not any(hits[:-1])  # the first prefix that spells the marker, not before
    assert Stops(frozenset({ids[1]}), "", tokenizer).hit(ids[:2])


def test_sampling_warp_equals_transformers_warpers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    for temperature, top_p in [(1.0, 0.9), (0.7, 0.5), (1.3, 1.0), (0.5, 0.01)]:
        want = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_p < 1.0:
            want = TopPLogitsWarper(top_p)(None, want)
        got = Sampling(True, temperature, top_p).warp(logits)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        assert torch.allclose(got[~torch.isinf(got)], want[~torch.isinf(want)])


def test_sampling_is_seeded_and_within_the_nucleus(tokenizer, tmpl, chatty):
    prompts = prompt_ids(tokenizer, tmpl, 5, seed=4)
    stops = Stops(frozenset(), "", tokenizer)  # no stop: every row runs to its budget

    def run(seed):
        return decode(chatty, prompts, [6] * 5, stops, IM_END, 2,
                      Sampling(True, 1.0, 0.5, torch.Generator().manual_seed(seed)))

    a, b, c = run(0), run(0), run(1)
    assert a == b and a != c
    for ids, new in zip(prompts, a):  # each sampled token lies in its step's top-p=0.5 nucleus
        for k, t in enumerate(new):
            with torch.no_grad():
                logits = chatty(torch.tensor([ids + new[:k]])).logits[:, -1]
            assert not torch.isinf(Sampling(True, 1.0, 0.5).warp(logits)[0, t])


def test_growing_layer_keeps_what_a_concatenation_keeps():
    g = torch.Generator().manual_seed(0)
    layer, ref_k = GrowingLayer(), None
    for n in (5, 1, 1, 70, 1):  # past the first capacity (64): the buffer doubles
        k, v = torch.randn(3, 2, n, 4, generator=g), torch.randn(3, 2, n, 4, generator=g)
        keys, values = layer.update(k, v)
        ref_k = k if ref_k is None else torch.cat([ref_k, k], dim=2)
        assert torch.equal(keys, ref_k) and layer.get_seq_length() == ref_k.shape[2]
    layer.batch_select_indices(torch.tensor([2, 0]))
    ref_k = ref_k[[2, 0]]
    assert torch.equal(layer.keys, ref_k)
    layer.drop_left(10)
    ref_k = ref_k[:, :, 10:]
    assert torch.equal(layer.keys, ref_k)
    other = GrowingLayer()
    ok, ov = torch.randn(1, 2, 20, 4, generator=g), torch.randn(1, 2, 20, 4, generator=g)
    other.update(ok, ov)
    width = ref_k.shape[2]
    buf = layer.key_buf
    layer.join(other, 0, width - 20, row_capacity=6)  # room (3 rows): written into the free slot
    assert torch.equal(layer.keys[:2], ref_k) and layer.key_buf is buf
    assert torch.equal(layer.keys[2:, :, width - 20:], ok) and not layer.keys[2:, :, :width - 20].any()
    ref_k = layer.keys.clone()
    layer.join(other, 0, width - 20, row_capacity=6)  # no room: new buffers with room for 6 rows
    assert layer.key_buf.shape[0] == 6 and torch.equal(layer.keys[:3], ref_k) and torch.equal(layer.keys[3], ref_k[2])
    buf = layer.key_buf
    layer.move_rows([0], [3], 3)  # row 0 leaves, the last row takes its slot
    assert torch.equal(layer.keys, ref_k[[2, 1, 2]]) and layer.key_buf is buf
    wide = GrowingLayer()
    wk = torch.randn(2, 2, width + 3, 4, generator=g)
    wide.update(wk, wk)
    layer.join(wide, 3, 0)  # a wider joiner: this layer's rows are left-padded by 3
    assert torch.equal(layer.keys[:3, :, 3:], ref_k[[2, 1, 2]]) and not layer.keys[:3, :, :3].any()
    assert torch.equal(layer.keys[3:], wk) and layer.get_seq_length() == width + 3
    step = torch.randn(5, 2, 1, 4, generator=g)
    keys, _ = layer.update(step, step)
    assert keys.shape == (5, 2, width + 4, 4) and torch.equal(keys[:, :, -1:], step)


def test_fast_path_is_refused_with_a_reason_for_sliding_window_caches():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from conftest import make_tiny_llama

    assert fast_path_problem(make_tiny_llama()) is None
    cfg = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=4)
    problem = fast_path_problem(Gemma2ForCausalLM(cfg))
    assert problem and "DynamicSlidingWindowLayer" in problem
    with pytest.raises(ValueError, match="cannot run this model"):
        decode(Gemma2ForCausalLM(cfg), [[1, 2]], [2], Stops(frozenset()), 0)


def test_bad_arguments_are_errors(tokenizer, chatty):
    stops = Stops(frozenset({IM_END}))
    with pytest.raises(ValueError, match="budgets"):
        decode(chatty, [[1, 2]], [2, 3], stops, IM_END)
    with pytest.raises(ValueError, match="at least 1"):
        decode(chatty, [[1, 2]], [0], stops, IM_END)
    with pytest.raises(ValueError, match="empty prompt"):
        decode(chatty, [[]], [2], stops, IM_END)
