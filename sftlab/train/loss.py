"""The SFT loss: a sum of (weighted) next-token NLL over trained positions, computed chunk by chunk.

Why a sum and not a mean: the loss of an optimizer step is `sum(nll over every trained token of every
micro-batch and process) / sum(their weights)`. Each micro-batch therefore returns `(weighted_nll_sum,
weight_sum)` and the caller divides by the global total, so examples count by their trained tokens no matter
how they were split into micro-batches (a mean of per-micro-batch means would not be).

Why chunked: the LM head over all positions is [tokens x vocab] (4k tokens x 49k vocab x fp32 = 800 MB,
plus as much again for the gradient). Only trained positions need logits, so `chunked_ce_sum` gathers their
hidden states first and runs the head and cross-entropy on `chunk_size` of them at a time, each chunk under
`torch.utils.checkpoint` so backward recomputes one chunk's logits instead of keeping all of them. The head
runs in the model's dtype (bf16 under autocast); the logits are upcast to fp32 before the softmax.

The model body is called without its head (`model_hidden_states`), which works for any HF causal LM whose
head is a plain projection, and for a peft-wrapped one: LoRA layers live inside the body's modules, so calling
the body of the unwrapped base model keeps them active.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
# configs whose CausalLM head does more than a projection (softcapping, scaling), which we would skip
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _nll(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="none")


def chunked_ce_sum(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, weights: torch.Tensor | None = None,
                   chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sum of weight * NLL, sum of weight)` over positions t whose next label labels[t+1] is not -100.

    hidden [B, T, H] (last hidden states, before the head), labels [B, T] (HF convention, unshifted),
    weights [B, T] (weight of the token at that position, i.e. of the target; None = 1 for every trained one).
    Never holds more than `chunk_size` positions' logits, in forward or backward.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    labels = labels.to(hidden.device)
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]  # position t predicts token t+1
    targets = targets.reshape(-1)
    keep = (targets != IGNORE).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    y = targets.index_select(0, keep)
    w = None
    if weights is not None:
        w = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
        w[:, :-1] = weights.to(hidden.device, torch.float32)[:, 1:]
        w = w.reshape(-1).index_select(0, keep)

    grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in lm_head.parameters()))
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    # at least one (possibly empty) chunk, so the result stays connected to hidden and the head's parameters
    for s in range(0, max(len(y), 1), chunk_size):
        hc, yc = h[s:s + chunk_size], y[s:s + chunk_size]
        nll = checkpoint(_nll, lm_head, hc, yc, use_reentrant=False) if grad else _nll(lm_head, hc, yc)
        total = total + (nll.sum() if w is None else (nll * w[s:s + chunk_size]).sum())
    weight_sum = w.sum() if w is not None else torch.tensor(float(len(y)), device=hidden.device)
    return total, weight_sum


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(model: nn.Module) -> nn.Module:
    """The LM head (output projection) of an HF causal LM, peft-wrapped or not."""
    head = _base_model(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(_base_model(model)).__name__} has no output embeddings (not a causal LM?)")
    return head


def model_hidden_states(model: nn.Module, batch: dict) -> torch.Tensor:
    """Last hidden states [B, T, H] of the model body (no LM head) for a collated batch.

    Passes only input_ids / attention_mask / position_ids (moved to the model's device) and `use_cache=False`:
    with a cache, transformers skips packed-sequence detection and packed examples would attend to each other.
    """
    base = _base_model(model)
    cfg = getattr(base, "config", None)
    for name in _LOGIT_POSTPROCESSING:
        value = getattr(cfg, name, None) if cfg is not None else None
        if value not in (None, 1, 1.0):
            raise NotImplementedError(f"{type(base).__name__} post-processes its logits ({name}={value}); "
                                      f"the chunked loss would skip that")
    body = base.get_decoder()
    if body is base:
        raise ValueError(f"cannot find the decoder body of {type(base).__name__}")
    device = base.get_input_embeddings().weight.device
    inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if batch.get(k) is not None}
    return body(**inputs, use_cache=False).last_hidden_state


def sft_loss_sum(model: nn.Module, batch: dict, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """`(weighted NLL sum, weight sum)` of a collated batch (`collate_packed` or `collate_padded` output)."""
    hidden = model_hidden_states(model, batch)
    return chunked_ce_sum(hidden, output_head(model), batch["labels"], batch.get("weights"), chunk_size)
