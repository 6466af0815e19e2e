"""Packing and batching: best-fit rows, length-grouped batches, exact collated tensors, and packed rows whose
logits equal each example run alone (the model's own block-diagonal mask from position_ids)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from sftlab.attention import register as register_segments
from sftlab.data.packing import collate_packed, collate_padded, length_grouped_batches, pack_best_fit
from sftlab.data.tokenize import Example
from sftlab.train.loss import model_hidden_states, output_head

from conftest import make_tiny_llama

V = 1024  # tiny vocabulary: random ids need no real tokenizer, and the head stays cheap on 2 shared cores


def _reference_best_fit(lengths, max_tokens):
    """Quadratic textbook best-fit-decreasing."""
    rows, rooms = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if rooms[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: rooms[r])
        else:
            r = len(rows)
            rows.append([])
            rooms.append(max_tokens)
        rows[r].append(i)
        rooms[r] -= lengths[i]
    return rows


def _fills(rows, lengths):
    return sorted(sum(lengths[i] for i in row) for row in rows)


def test_pack_best_fit_known_case():
    assert pack_best_fit([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    assert pack_best_fit([8, 8], 8) == [[0], [1]]
    assert pack_best_fit([], 8) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_best_fit_matches_reference_and_bounds(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 60), rng.randint(100, 500)]) for _ in range(400)]
    rows = pack_best_fit(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    # same row fills as the textbook algorithm (which of several rows with equal room gets an item is free)
    assert _fills(rows, lengths) == _fills(_reference_best_fit(lengths, 512), lengths)
    # BFD guarantee: at most 11/9 OPT + 6/9 rows, OPT >= total / capacity
    assert len(rows) <= 11 / 9 * math.ceil(sum(lengths) / 512) + 6 / 9 + 1e-9
    assert pack_best_fit(lengths, 512) == rows  # deterministic


def test_pack_best_fit_errors_name_the_example():
    with pytest.raises(ValueError, match=r"example 2 has 9 tokens, more than max_tokens=8"):
        pack_best_fit([3, 8, 9], 8)
    with pytest.raises(ValueError, match=r"example 1 is empty"):
        pack_best_fit([3, 0], 8)


def test_length_grouped_batches_known_case():
    lengths = [10, 3, 9, 4, 2]
    assert length_grouped_batches(lengths, batch_tokens=20, shuffle=False) == [[0, 2], [3, 1, 4]]
    assert length_grouped_batches(lengths, batch_size=2, shuffle=False) == [[0, 2], [3, 1], [4]]
    with pytest.raises(ValueError, match="exactly one"):
        length_grouped_batches(lengths)
    with pytest.raises(ValueError, match=r"example 0 has 10 tokens, more than batch_tokens=9"):
        length_grouped_batches(lengths, batch_tokens=9)


def test_length_grouped_batches_properties():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(1000)]
    a = length_grouped_batches(lengths, batch_tokens=2048, seed=3)
    assert a == length_grouped_batches(lengths, batch_tokens=2048, seed=3)
    assert a != length_grouped_batches(lengths, batch_tokens=2048, seed=4)
    assert sorted(i for b in a for i in b) == list(range(1000))
    assert all(len(b) * max(lengths[i] for i in b) <= 2048 for b in a)
    # grouped by length: padding wastes little (sorted neighbours), far less than random batches would
    padded = sum(len(b) * max(lengths[i] for i in b) for b in a)
    assert sum(lengths) / padded > 0.9
    fixed = length_grouped_batches(lengths, batch_size=16, seed=3)
    assert [len(b) for b in fixed].count(16) == 62 and sorted(len(b) for b in fixed)[0] == 1000 - 62 * 16
    # the batch with the most padded tokens comes first (memory peak and any out-of-memory at step 1) ...
    size = [len(b) * max(lengths[i] for i in b) for b in fixed]
    assert size[0] == max(size)
    # ... and the rest keep the shuffled order (not sorted by size)
    assert size[1:] != sorted(size[1:], reverse=True) and size[1:] != sorted(size[1:])


def test_epoch_batches_largest_first_both_batchings(tmp_path):
    from sftlab.config import load_config
    from sftlab.data.tokenize import Example
    from sftlab.train.plan import epoch_batches

    rng = random.Random(1)
    examples = [Example(list(range(n)), [-100] * n) for n in (rng.randint(5, 120) for _ in range(200))]
    for extra in (["train.batching=length_grouped", "train.batch_size=8"],
                  ["train.batching=packed", "train.batch_tokens=256"]):
        cfg = load_config(None, [f"output_dir={tmp_path}", "data.train=[x.jsonl]", *extra])
        for epoch in (0, 1):
            plan = epoch_batches(examples, cfg, epoch)
            assert sorted(i for b in plan for i in b) == list(range(200))
            lens = [[len(examples[i].input_ids) for i in b] for b in plan]
            size = [sum(ls) if "packed" in extra[0] else len(ls) * max(ls) for ls in lens]
            assert size[0] == max(size), (extra, epoch)


def test_collate_packed_exact():
    a = Example([10, 11, 12, 13], [-100, -100, 12, 13])
    b = Example([20, 21, 22], [20, 21, 22], weights=[0.5, 0.5, 1.0])
    c = Example([30, 31], [-100, 31])
    out = collate_packed([a, b, c])
    assert out["input_ids"].tolist() == [[10, 11, 12, 13, 20, 21, 22, 30, 31]]
    # b's first token is not a target (13 must not predict 20); weights 0 wherever the label is -100
    assert out["labels"].tolist() == [[-100, -100, 12, 13, -100, 21, 22, -100, 31]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert out["weights"].tolist() == [[0, 0, 1, 1, 0, 0.5, 1, 0, 1]]
    assert out["cu_seqlens"].dtype == torch.int32 and out["cu_seqlens"].tolist() == [0, 4, 7, 9]
    assert out["seq_lens"] == [4, 3, 2]
    assert "attention_mask" not in out


def test_collate_padded_exact():
    a = Example([10, 11, 12], [-100, 11, 12])
    b = Example([20, 21], [20, 21], weights=[0.25, 1.0])
    out = collate_padded([a, b], pad_token_id=2)
    assert out["input_ids"].tolist() == [[10, 11, 12], [20, 21, 2]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["labels"].tolist() == [[-100, 11, 12], [20, 21, -100]]
    assert out["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert out["weights"].tolist() == [[0, 1, 1], [0.25, 1, 0]]


def _random_examples(n, seed, lo=3, hi=40):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids = torch.randint(3, V, (length,), generator=g).tolist()
        cut = int(torch.randint(1, length, (1,), generator=g))
        out.append(Example(ids, [-100] * cut + ids[cut:]))
    return out


@pytest.mark.parametrize("impl", ["eager", "sdpa", "segments"])
def test_packed_logits_equal_unpacked(impl):
    """transformers (>= 4.56 pin, 5.23 here) builds a block-diagonal causal mask from restarting position_ids;
    sftlab's `segments` attention runs causal attention per segment instead."""
    model = make_tiny_llama(vocab_size=V)
    if impl == "segments":
        register_segments()
    model.set_attn_implementation(impl)
    assert model.config.use_cache  # the default; model_hidden_states must turn it off for packing
    examples = _random_examples(20, seed=1)
    rows = pack_best_fit([len(e.input_ids) for e in examples], 96)
    assert len(rows) < 20 and any(len(r) >= 3 for r in rows)
    head = output_head(model)
    with torch.no_grad():
        for row in rows:
            batch = collate_packed([examples[i] for i in row])
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            alone = torch.cat([model(input_ids=torch.tensor([examples[i].input_ids])).logits for i in row], 1)
            torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
            via_helper = head(model_hidden_states(model, batch))
            torch.testing.assert_close(via_helper, alone, atol=1e-5, rtol=0)
