"""`segments` attention (sftlab/attention.py): causal attention per example, equal to transformers' masked SDPA."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_llama
from sftlab.attention import register, segment_bounds
from sftlab.data.packing import collate_packed, collate_padded
from sftlab.data.tokenize import Example
from sftlab.train.loss import sft_loss_sum

V = 1024


def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, V, (n,), generator=g).tolist()
        out.append(Example(ids, [-100] * (n // 2) + ids[n // 2:]))
    return out


def _loss_and_grads(model, batch):
    model.zero_grad()
    total, count = sft_loss_sum(model, batch)
    (total / count).backward()
    return float((total / count).detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("collate", ["padded", "packed"])
def test_segments_loss_and_gradients_equal_masked_sdpa(collate):
    """Right-padded rows (different lengths) and one packed row: same loss and gradients as HF's sdpa with its mask."""
    register()
    examples = _examples([7, 23, 15, 31, 4], seed=1)
    batch = collate_padded(examples, pad_token_id=2) if collate == "padded" else collate_packed(examples)
    ref_model = make_tiny_llama(vocab_size=V).train()
    ref_model.set_attn_implementation("sdpa")
    seg_model = make_tiny_llama(vocab_size=V).train()
    seg_model.set_attn_implementation("segments")
    ref_loss, ref_grads = _loss_and_grads(ref_model, batch)
    seg_loss, seg_grads = _loss_and_grads(seg_model, batch)
    assert seg_loss == pytest.approx(ref_loss, rel=1e-6)
    for n, g in ref_grads.items():
        torch.testing.assert_close(seg_grads[n], g, atol=1e-6, rtol=1e-5)


def test_segment_bounds_and_errors():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    assert segment_bounds(pos) == [[0, 3, 5, 9], [0, 9]]
    with pytest.raises(ValueError, match="start at position 0"):
        segment_bounds(torch.tensor([[3, 4, 0, 1]]))
    register()
    model = make_tiny_llama(vocab_size=V)
    model.set_attn_implementation("segments")
    with pytest.raises(ValueError, match="without a KV cache"):  # generation needs another implementation
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
