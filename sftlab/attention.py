"""`segments`: causal attention per example, for sftlab's training batches (right-padded rows or packed rows).

The training loop's batches have one shape of attention: each example attends causally to itself and to nothing
else. Right-padded rows (`length_grouped`) start at position 0 and have their padding at the end; packed rows
(`packed`) hold several examples whose position ids restart at 0. In both, the position ids alone define the
attention, so no mask is needed:

- padded rows: plain causal attention over the row. A real token never sees the padding after it, so its output
  is exactly the masked one; padding positions compute values nobody reads (their labels are -100).
- packed rows: causal attention within each segment (a run of positions starting at 0), segment by segment.
  The work is Σ nᵢ² over the row's examples instead of the row length squared, and examples never see each other.

Each causal block goes to `causal_attention`: on CPU, for blocks of at most `Kernels.bmm_max_len` tokens, a bmm kernel
(`CausalBmmAttention`: two batched matmuls forward, recomputation plus four backward, softmax and its backward as
single fused ops, examples processed in cache-sized chunks); otherwise `scaled_dot_product_attention(...,
is_causal=True)` without a mask (the flash kernel's causal path). PyTorch's CPU flash kernel has a large fixed cost
in its backward, so short blocks, which is most SFT data, are cheaper on the bmm path, while long ones are cheaper
on flash, which skips the masked half (measured: docs/benchmarks.md, "CPU kernels and memory"). Registered with
transformers' `AttentionInterface` (its extension point for attention functions; nothing is patched) under the name
`segments`; transformers then passes no mask, only `position_ids`. Not for generation or left padding: training
and scoring of right-padded or packed batches only (the training loop's `model.attn_implementation: auto` picks
it on CPU).

What a model adds to causal attention arrives as arguments of the attention call, per layer, and `segments`
implements each as transformers' eager attention defines it (`explicit_attention`, scores written out, per
segment): sliding windows (`sliding_window`: Mistral, Qwen2, Gemma-2/3, Cohere-2, gpt-oss, OLMo-3, Starcoder-2,
...), attention-logit soft-capping (`softcap`: Gemma-2) and attention sinks (`s_aux`: gpt-oss). Blocks without
them (or with a window at least as long as the block) take the fast kernels. What it does not implement is an
error (`SegmentsError`), and `model.attn_implementation: auto` does not choose `segments` for configs with
attention patterns that live only in the mask (`models.segments_unsupported`: chunked attention, bidirectional
layers); `sftlab.modelcheck` probes the result once per training run.

Numerics of the bmm kernel: scores and probabilities are rounded to the inputs' dtype (in bf16 ~1e-2 relative
error in outputs and gradients against an fp64 reference, ~2.5x the flash kernel's, which keeps scores in fp32;
the same as transformers' `eager` attention in bf16); in fp32 it agrees with SDPA to ~1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

NAME = "segments"


class SegmentsError(ValueError):
    """A model asks `segments` for something it does not do (a mask, a KV cache, non-causal attention, ...)."""


@dataclass(frozen=True)
class Kernels:
    """Which kernel a causal block takes. The defaults are sftlab's; a benchmark registers other settings under
    another name (`register("segments_flash", Kernels(bmm_max_len=0))`)."""
    bmm_max_len: int = 768  # CPU blocks up to this length take the bmm kernel (crossover between 512 and 1024)
    chunk_bytes: int = 4 << 20  # the bmm kernel's score tensor per chunk of examples (cache-sized)
    sdpa_gqa: bool = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa: no K/V repeat


DEFAULT_KERNELS = Kernels()


def _causal_mask(t: int, device: torch.device) -> torch.Tensor:
    """[t, t], True above the diagonal: the future positions a query must not see."""
    return torch.ones(t, t, dtype=torch.bool, device=device).triu_(1)


def _probs(qs: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, groups: int) -> torch.Tensor:
    """softmax(qs kᵀ + causal mask) for qs [b, Hkv, g*T, D] (scaled queries, grouped by KV head), k [b, Hkv, T, D]."""
    b, hkv, gt, _ = qs.shape
    t = k.shape[2]
    s = torch.matmul(qs, k.transpose(-1, -2))
    s.view(b, hkv, groups, t, t).masked_fill_(mask, float("-inf"))
    return torch.softmax(s, dim=-1)


class CausalBmmAttention(torch.autograd.Function):
    """Causal attention of right-aligned blocks with batched matmuls; saves only q, k, v (P recomputed backward).

    q [B, Hq, T, D], k/v [B, Hkv, T, D] with Hq a multiple of Hkv (grouped-query attention without repeating
    K/V: the g query heads of one KV head are stacked as g*T rows). Examples are processed in chunks whose score
    tensor stays near `chunk_bytes`.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float, chunk_bytes: int = DEFAULT_KERNELS.chunk_bytes):
        bsz, hq, t, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        qs = (q * scale).reshape(bsz, hkv, g * t, d)
        mask = _causal_mask(t, q.device)
        chunk = max(1, chunk_bytes // (hq * t * t * q.element_size()))
        out = torch.empty(bsz, hkv, g * t, v.shape[-1], dtype=q.dtype, device=q.device)
        for i in range(0, bsz, chunk):
            torch.matmul(_probs(qs[i:i + chunk], k[i:i + chunk], mask, g), v[i:i + chunk], out=out[i:i + chunk])
        ctx.save_for_backward(qs, k, v)
        ctx.scale, ctx.chunk, ctx.groups = scale, chunk, g
        return out.view(bsz, hq, t, v.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        qs, k, v = ctx.saved_tensors
        bsz, hkv, gt, d = qs.shape
        t, g, chunk = k.shape[2], ctx.groups, ctx.chunk
        mask = _causal_mask(t, qs.device)
        go = grad_out.reshape(bsz, hkv, gt, v.shape[-1])
        dq, dk, dv = torch.empty_like(qs), torch.empty_like(k), torch.empty_like(v)
        for i in range(0, bsz, chunk):
            sl = slice(i, i + chunk)
            p = _probs(qs[sl], k[sl], mask, g)
            torch.matmul(p.transpose(-1, -2), go[sl], out=dv[sl])
            dp = torch.matmul(go[sl], v[sl].transpose(-1, -2))
            ds = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype)  # p * (dp - rowsum(dp * p))
            del p, dp
            torch.matmul(ds, k[sl], out=dq[sl])
            torch.matmul(ds.transpose(-1, -2), qs[sl], out=dk[sl])
        dq.mul_(ctx.scale)
        return dq.view(bsz, hkv * g, t, d), dk, dv, None, None


def kernel_for(query: torch.Tensor, dropout: float, kernels: Kernels = DEFAULT_KERNELS) -> str:
    """"bmm" for CPU blocks of at most `kernels.bmm_max_len` tokens without dropout, else "sdpa"."""
    return "bmm" if query.device.type == "cpu" and query.shape[2] <= kernels.bmm_max_len and dropout == 0.0 else "sdpa"


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None,
                     dropout: float = 0.0, kernels: Kernels = DEFAULT_KERNELS) -> torch.Tensor:
    """Causal attention of [B, Hq, T, D] queries over [B, Hkv, T, D] keys/values (no mask): [B, Hq, T, D].

    `kernel_for` chooses: `CausalBmmAttention`, or SDPA's causal path (flash on CPU and CUDA).
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if kernel_for(query, dropout, kernels) == "bmm":
        # one dtype for all three: under autocast its dtype (as SDPA would run), else their promotion (rotary
        # embeddings in fp32 can leave q and k in fp32 beside a bf16 v)
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
        else:
            dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
        with torch.autocast("cpu", enabled=False):
            return CausalBmmAttention.apply(query.to(dtype), key.to(dtype), value.to(dtype), scale, kernels.chunk_bytes)
    gqa = {}
    if key.shape[1] != query.shape[1]:  # grouped-query attention
        if kernels.sdpa_gqa:
            gqa = {"enable_gqa": True}
        else:
            rep = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scale, **gqa)


def segment_bounds(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the start index of every segment (positions restarting at 0) and the row length at the end."""
    rows = []
    length = position_ids.shape[-1]
    for row in position_ids:
        starts = (row == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            raise SegmentsError("segments attention: every row must start at position 0 (right padding or packing)")
        rows.append(starts + [length])
    return rows


@dataclass(frozen=True)
class Variant:
    """What a model's attention adds to plain causal attention, as its attention module hands it over.

    window: sliding-window attention (`sliding_window`): a query at i sees keys j with i - window < j <= i, as in
    transformers' `sliding_window_overlay`. softcap: attention-logit soft-capping, scores -> tanh(s / c) * c
    (Gemma-2). sinks: one learned logit per query head that joins every softmax and is then dropped (`s_aux`,
    gpt-oss). None of them: the fast kernels of `causal_attention`."""
    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    def plain(self, t: int) -> bool:
        return (self.window is None or self.window >= t) and self.softcap is None and self.sinks is None


def explicit_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, dropout: float,
                       variant: Variant) -> torch.Tensor:
    """Causal attention of one block with the scores written out (as transformers' eager attention computes them):
    soft-capping, a sliding window and sinks as `variant` says. [B, Hq, T, D] -> [B, Hq, T, Dv]."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if variant.softcap is not None:
        scores = torch.tanh(scores / variant.softcap) * variant.softcap
    t = query.shape[2]
    i = torch.arange(t, device=query.device)
    hidden = i[None, :] > i[:, None]  # the future
    if variant.window is not None:
        hidden |= i[None, :] <= i[:, None] - variant.window  # beyond the window
    scores = scores.masked_fill(hidden, float("-inf"))
    if variant.sinks is not None:
        sinks = variant.sinks.reshape(1, -1, 1, 1).to(scores.dtype).expand(scores.shape[0], -1, t, 1)
        scores = torch.cat([scores, sinks], dim=-1)
        scores = scores - scores.max(dim=-1, keepdim=True).values
        probs = torch.softmax(scores, dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    probs = F.dropout(probs.to(query.dtype), p=dropout, training=dropout > 0)
    return torch.matmul(probs.to(value.dtype), value)


def _block(query, key, value, scale, dropout, variant, kernels):
    if variant.plain(query.shape[2]):
        return causal_attention(query, key, value, scale, dropout, kernels)
    return explicit_attention(query, key, value, query.shape[-1] ** -0.5 if scale is None else scale, dropout, variant)


# attention-function arguments that change what attention computes and that `segments` does not implement
UNSUPPORTED = ("position_bias", "indices", "block_indices")


def segments_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       position_ids: torch.Tensor | None = None, kernels: Kernels = DEFAULT_KERNELS,
                       sliding_window: int | None = None, softcap: float | None = None,
                       s_aux: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, Hq, T, D], key/value [B, Hkv, T, D] -> ([B, T, Hq, D], None), transformers' attention contract."""
    name = type(module).__name__
    if attention_mask is not None:
        raise SegmentsError("segments attention takes no mask (it reads position_ids); use attn_implementation sdpa")
    if key.shape[2] != query.shape[2]:
        raise SegmentsError("segments attention is for training and scoring without a KV cache")
    if position_ids is None:
        raise SegmentsError(f"segments attention needs position_ids, and {name} does not pass them to "
                         f"its attention function; set model.attn_implementation=sdpa")
    if key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        raise SegmentsError(f"segments attention: {query.shape[1]} query heads are not a multiple of {key.shape[1]} "
                         f"key/value heads")
    if is_causal is False:
        raise SegmentsError(f"segments attention is causal and {name} asks for non-causal attention; "
                         f"set model.attn_implementation=sdpa")
    extra = [k for k in UNSUPPORTED if kwargs.get(k) is not None]
    if extra:
        raise SegmentsError(f"segments attention does not implement {', '.join(extra)} (passed by {name}); "
                         f"set model.attn_implementation=sdpa or eager")
    variant = Variant(sliding_window, softcap, s_aux if s_aux is not None else sinks)
    p = dropout if module.training else 0.0
    bounds = None
    position_ids = position_ids.reshape(-1, position_ids.shape[-1]).expand(query.shape[0], -1)
    if bool((position_ids[:, 1:] == 0).any()):  # a packed row: several segments
        bounds = segment_bounds(position_ids)
    if bounds is None:
        out = _block(query, key, value, scaling, p, variant, kernels)
    else:
        rows = []
        for b, starts in enumerate(bounds):
            parts = [_block(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                            scaling, p, variant, kernels)
                     for s, e in zip(starts, starts[1:])]
            rows.append(torch.cat(parts, dim=2))
        out = torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME, kernels: Kernels = DEFAULT_KERNELS) -> str:
    """Make `attn_implementation=name` (default "segments") known to transformers, with these kernel settings;
    returns the name."""
    from transformers import AttentionInterface

    fn = segments_attention if kernels == DEFAULT_KERNELS else partial(segments_attention, kernels=kernels)
    AttentionInterface.register(name, fn)
    return name
