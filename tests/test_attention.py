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


def _qkv(b, t, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # laid out like a model's projections: [B, T, H, D] transposed to [B, H, T, D] (not contiguous)
    q = (2 * torch.randn(b, t, hq, d, generator=g)).to(dtype).transpose(1, 2)
    k = (2 * torch.randn(b, t, hkv, d, generator=g)).to(dtype).transpose(1, 2)
    v = torch.randn(b, t, hkv, d, generator=g).to(dtype).transpose(1, 2)
    return q, k, v


def _attn_grads(fn, q, k, v, go):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(go.to(out.dtype))
    return [out, q.grad, k.grad, v.grad]


def _sdpa_reference(q, k, v):
    rep = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2)])
def test_bmm_attention_equals_sdpa_in_fp32(hq, hkv):
    """The bmm kernel (forward and its hand-written backward) is causal attention: equal to SDPA in fp32, with
    grouped-query heads (no K/V repeat) and without."""
    from sftlab.attention import CausalBmmAttention

    q, k, v = _qkv(3, 37, hq, hkv, 16, torch.float32)
    go = torch.randn(3, hq, 37, 16, generator=torch.Generator().manual_seed(1))
    got = _attn_grads(lambda a, b, c: CausalBmmAttention.apply(a, b, c, 16 ** -0.5), q, k, v, go)
    ref = _attn_grads(_sdpa_reference, q, k, v, go)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_bmm_attention_bf16_error_is_bounded_and_chunking_changes_nothing():
    """bf16: outputs and gradients within 2e-2 (relative norm) of an fp64 reference; the chunk size (examples per
    batched matmul) does not change any value."""
    import sftlab.attention as attention

    q, k, v = _qkv(4, 50, 6, 2, 32, torch.bfloat16, seed=2)
    go = torch.randn(4, 6, 50, 32, generator=torch.Generator().manual_seed(3))

    def bmm(a, b, c, chunk_bytes=attention.DEFAULT_KERNELS.chunk_bytes):
        return attention.CausalBmmAttention.apply(a, b, c, 32 ** -0.5, chunk_bytes)

    ref = _attn_grads(_sdpa_reference, q.double(), k.double(), v.double(), go.double())
    whole = _attn_grads(bmm, q, k, v, go)
    for name, a, b in zip(("out", "dq", "dk", "dv"), whole, ref):
        assert float((a.detach().double() - b.detach()).norm() / b.detach().norm()) < 2e-2, name
    chunked = _attn_grads(lambda a, b, c: bmm(a, b, c, chunk_bytes=1), q, k, v, go)  # one example per chunk
    for name, a, b in zip(("out", "dq", "dk", "dv"), chunked, whole):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_causal_attention_dispatch():
    """CPU blocks up to bmm_max_len take the bmm kernel, longer ones (or with dropout) SDPA; every path is causal
    attention (SDPA with enable_gqa or with K/V repeated)."""
    from sftlab.attention import DEFAULT_KERNELS, Kernels, causal_attention, kernel_for

    q, k, v = _qkv(2, 20, 4, 2, 8, torch.float32)
    ref = _sdpa_reference(q, k, v)
    short = Kernels(bmm_max_len=19)
    assert kernel_for(q, 0.0) == "bmm" and kernel_for(q, 0.1) == "sdpa" and kernel_for(q, 0.0, short) == "sdpa"
    for kernels in (DEFAULT_KERNELS, short, Kernels(bmm_max_len=19, sdpa_gqa=not DEFAULT_KERNELS.sdpa_gqa)):
        torch.testing.assert_close(causal_attention(q, k, v, kernels=kernels), ref, atol=1e-5, rtol=1e-5)


def test_segments_under_bf16_autocast_matches_sdpa():
    """`train.precision: bf16` (autocast over fp32 weights) leaves q/k in fp32 after rotary beside a bf16 v: the
    bmm kernel runs them in the autocast dtype, as SDPA does; losses agree within bf16 tolerance."""
    register()
    batch = collate_padded(_examples([9, 30, 17], seed=4), pad_token_id=2)
    losses = {}
    for impl in ("sdpa", "segments"):
        model = make_tiny_llama(vocab_size=V).train()
        model.set_attn_implementation(impl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses[impl], grads = _loss_and_grads(model, batch)
        assert all(torch.isfinite(g).all() for g in grads.values())
    assert losses["segments"] == pytest.approx(losses["sdpa"], rel=2e-2)
