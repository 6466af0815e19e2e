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

The body/head split, the trained positions and the chunked per-position NLL are `sftlab.lm`'s (shared with
validation, the audit and evaluation); this module adds the weights and the KL term.

KL to the base model (`train.kl_to_base`): `chunked_ce_kl_sum` also returns sum_t KL(p_tuned || p_base) over the
same trained positions and with the same weights, from the same chunks: the base model's hidden states are
computed once without gradient (`base_hidden_states`: a frozen copy, or the peft model with its adapter disabled),
gathered at the trained positions, and each chunk's base logits are recomputed inside the chunk's checkpoint,
so neither model's logits ever exist for more than `chunk_size` positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..lm import model_hidden_states, nll_chunks, output_head, trained_positions

__all__ = ["chunked_ce_sum", "chunked_ce_kl_sum", "sft_loss_sum", "sft_kl_loss_sum", "base_hidden_states",
           "model_hidden_states", "output_head"]


def chunked_ce_sum(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, weights: torch.Tensor | None = None,
                   chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sum of weight * NLL, sum of weight)` over positions t whose next label labels[t+1] is not -100.

    hidden [B, T, H] (last hidden states, before the head), labels [B, T] (HF convention, unshifted),
    weights [B, T] (weight of the token at that position, i.e. of the target; None = 1 for every trained one).
    Never holds more than `chunk_size` positions' logits, in forward or backward.
    """
    keep, y, w = _trained_positions(hidden, labels, weights, chunk_size)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for s, nll in nll_chunks(lm_head, h, y, chunk_size):
        total = total + (nll.sum() if w is None else (nll * w[s:s + chunk_size]).sum())
    weight_sum = w.sum() if w is not None else torch.tensor(float(len(y)), device=hidden.device)
    return total, weight_sum


def _trained_positions(hidden, labels, weights, chunk_size):
    """`lm.trained_positions` of a batch whose hidden states are `hidden`, after checking the shapes agree."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    return trained_positions(labels, weights, device=hidden.device)


def _nll_kl(lm_head: nn.Module, base_head: nn.Module, hidden: torch.Tensor, base_hidden: torch.Tensor,
            targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL and KL(p_tuned || p_base) = sum_v p_t(v) (log p_t(v) - log p_b(v)), fp32."""
    logp = F.log_softmax(lm_head(hidden).float(), dim=-1)
    with torch.no_grad():
        logp_base = F.log_softmax(base_head(base_hidden).float(), dim=-1)
    nll = -logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    kl = (logp.exp() * (logp - logp_base)).sum(-1)
    return nll, kl


def chunked_ce_kl_sum(hidden: torch.Tensor, lm_head: nn.Module, base_hidden: torch.Tensor, base_head: nn.Module,
                      labels: torch.Tensor, weights: torch.Tensor | None = None,
                      chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`chunked_ce_sum` plus the (weighted) sum of KL(p_tuned || p_base) over the same trained positions.

    base_hidden [B, T, H]: the base model's last hidden states for the same batch (no gradient); base_head its LM
    head. Each chunk's base logits are computed inside the chunk (and recomputed in backward), never kept.
    """
    keep, y, w = _trained_positions(hidden, labels, weights, chunk_size)
    if base_hidden.shape != hidden.shape:
        raise ValueError(f"base hidden states {tuple(base_hidden.shape)} differ from {tuple(hidden.shape)}")
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    hb = base_hidden.detach().to(hidden.device).reshape(-1, hidden.shape[-1]).index_select(0, keep)
    grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in lm_head.parameters()))
    nll_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    kl_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for s in range(0, max(len(y), 1), chunk_size):
        args = (lm_head, base_head, h[s:s + chunk_size], hb[s:s + chunk_size], y[s:s + chunk_size])
        nll, kl = checkpoint(_nll_kl, *args, use_reentrant=False) if grad else _nll_kl(*args)
        if w is not None:
            nll, kl = nll * w[s:s + chunk_size], kl * w[s:s + chunk_size]
        nll_total, kl_total = nll_total + nll.sum(), kl_total + kl.sum()
    weight_sum = w.sum() if w is not None else torch.tensor(float(len(y)), device=hidden.device)
    return nll_total, weight_sum, kl_total


def sft_loss_sum(model: nn.Module, batch: dict, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """`(weighted NLL sum, weight sum)` of a collated batch (`collate_packed` or `collate_padded` output)."""
    hidden = model_hidden_states(model, batch)
    return chunked_ce_sum(hidden, output_head(model), batch["labels"], batch.get("weights"), chunk_size)


def base_hidden_states(model: nn.Module, batch: dict, base_model: nn.Module | None = None,
                       ) -> tuple[torch.Tensor, nn.Module]:
    """The base model's last hidden states for `batch` (no gradient, eval mode) and its LM head.

    base_model: a frozen copy of the model before training (full fine-tuning). None: `model` is a peft model and
    its adapter is switched off for this forward (`disable_adapter()`), so the base weights are not copied.
    """
    with torch.no_grad():
        if base_model is not None:
            return model_hidden_states(base_model, batch), output_head(base_model)
        if not hasattr(model, "disable_adapter"):
            raise ValueError("KL to the base model needs a frozen base copy or a peft model (adapter disabled)")
        modes = {m: m.training for m in model.modules()}
        model.eval()  # no dropout in the reference distribution
        try:
            with model.disable_adapter():
                hidden = model_hidden_states(model, batch)
        finally:
            for m, mode in modes.items():
                m.training = mode
        return hidden, output_head(model, without_adapter=True)


def sft_kl_loss_sum(model: nn.Module, batch: dict, base_model: nn.Module | None = None,
                    chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(weighted NLL sum, weight sum, weighted KL(p_tuned || p_base) sum)` of a collated batch."""
    base_hidden, base_head = base_hidden_states(model, batch, base_model)
    hidden = model_hidden_states(model, batch)
    return chunked_ce_kl_sum(hidden, output_head(model), base_hidden, base_head, batch["labels"],
                             batch.get("weights"), chunk_size)
