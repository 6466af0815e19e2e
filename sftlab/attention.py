"""`segments`: causal attention per example, for sftlab's training batches (right-padded rows or packed rows).

The training loop's batches have one shape of attention: each example attends causally to itself and to nothing
else. Right-padded rows (`length_grouped`) start at position 0 and have their padding at the end; packed rows
(`packed`) hold several examples whose position ids restart at 0. In both, the position ids alone define the
attention, so no mask is needed:

- padded rows: plain causal attention over the row. A real token never sees the padding after it, so its output
  is exactly the masked one; padding positions compute values nobody reads (their labels are -100).
- packed rows: causal attention within each segment (a run of positions starting at 0), segment by segment.
  The work is Σ nᵢ² over the row's examples instead of the row length squared, and examples never see each other.

Each call is `torch.nn.functional.scaled_dot_product_attention(..., is_causal=True)` without a mask, which on
CPU takes the flash kernel's causal path (a padding mask forces the slower masked path, and a packed row under
HF's `sdpa` builds a dense block-diagonal [T, T] mask). Registered with transformers' `AttentionInterface` (its
extension point for attention functions; nothing is patched) under the name `segments`; transformers then passes
no mask, only `position_ids`. Not for generation or left padding: training and scoring of right-padded or packed
batches only (the training loop's `model.attn_implementation: auto` picks it for packed rows on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "segments"


def segment_bounds(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the start index of every segment (positions restarting at 0) and the row length at the end."""
    rows = []
    length = position_ids.shape[-1]
    for row in position_ids:
        starts = (row == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            raise ValueError("segments attention: every row must start at position 0 (right padding or packing)")
        rows.append(starts + [length])
    return rows


def segments_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, Hq, T, D], key/value [B, Hkv, T, D] -> ([B, T, Hq, D], None), transformers' attention contract."""
    if attention_mask is not None:
        raise ValueError("segments attention takes no mask (it reads position_ids); use attn_implementation sdpa")
    if key.shape[2] != query.shape[2]:
        raise ValueError("segments attention is for training and scoring without a KV cache")
    if key.shape[1] != query.shape[1]:  # grouped-query attention
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    if position_ids is None:
        raise ValueError(f"segments attention needs position_ids, and {type(module).__name__} does not pass them to "
                         f"its attention function; set model.attn_implementation=sdpa")
    p = dropout if module.training else 0.0
    bounds = None
    position_ids = position_ids.reshape(-1, position_ids.shape[-1]).expand(query.shape[0], -1)
    if bool((position_ids[:, 1:] == 0).any()):  # a packed row: several segments
        bounds = segment_bounds(position_ids)
    if bounds is None:
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=p, is_causal=True, scale=scaling)
    else:
        rows = []
        for b, starts in enumerate(bounds):
            parts = [F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e],
                                                    value[b:b + 1, :, s:e], dropout_p=p, is_causal=True,
                                                    scale=scaling)
                     for s, e in zip(starts, starts[1:])]
            rows.append(torch.cat(parts, dim=2))
        out = torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make `attn_implementation="segments"` known to transformers; returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, segments_attention)
    return NAME
