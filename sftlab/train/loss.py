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

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..lm import model_hidden_states, nll_chunks, output_head, trained_positions

__all__ = ["chunked_ce_sum", "chunked_ce_kl_sum", "chunked_objective_sums", "sft_loss_sum", "sft_kl_loss_sum",
           "sft_objective_sums", "base_hidden_states", "model_hidden_states", "output_head", "TokenObjective",
           "LossSums"]


@dataclass(frozen=True)
class TokenObjective:
    """How each trained token's NLL is weighted (`train.objective`); the weights are detached (no gradient flows
    through them), and the normaliser stays the global count of trained tokens.

    - `nll`: weight 1 — plain SFT, log p(response | instruction).
    - `dft` (Wu et al. 2025, arXiv 2508.05629, "Dynamic Fine-Tuning"): the token's own probability under the
      current model, sg(p(y_t)) = exp(-NLL_t), so the gradient is that of -sg(p) log p.
    - `eaft` (Diao et al. 2026, arXiv 2601.02151): the normalised entropy of the model's top-k distribution,
      (H_k / ln k) ** alpha, with H_k = -sum_i q_i ln q_i over q = softmax of the k largest logits — near 0 where the
      model is confident (a "confident conflict" if it disagrees with the label), near 1 where it is uncertain.
      The paper's code divides by 3.0 (≈ ln 20); this divides by ln k exactly.
    """

    kind: str = "nll"
    top_k: int = 20
    alpha: float = 1.0

    def __post_init__(self):
        if self.kind not in ("nll", "dft", "eaft"):
            raise ValueError(f"objective must be nll, dft or eaft, got {self.kind!r}")
        if self.top_k < 2 or self.alpha <= 0:
            raise ValueError(f"eaft needs top_k >= 2 and alpha > 0, got {self.top_k}, {self.alpha}")

    def token_weights(self, logits: torch.Tensor, nll: torch.Tensor) -> torch.Tensor | None:
        """Detached per-position weights from fp32 logits [N, V] and their NLL [N] (None for `nll`)."""
        with torch.no_grad():
            if self.kind == "dft":
                return torch.exp(-nll.detach())
            if self.kind == "eaft":
                k = min(self.top_k, logits.shape[-1])
                logq = torch.log_softmax(logits.detach().topk(k, dim=-1).values, dim=-1)
                entropy = -(logq.exp() * logq).sum(-1)
                return (entropy / math.log(k)).clamp(min=0.0) ** self.alpha
        return None


class LossSums(NamedTuple):
    """Sums over a micro-batch's trained positions, each weighted by the example weights: `objective` (the
    token-weighted NLL that is optimised; the plain NLL for `nll`), `weight` (the normaliser), `kl` (KL to the
    base model, None without it) and `nll` (the plain NLL, detached: what validation and the logs report)."""

    objective: torch.Tensor
    weight: torch.Tensor
    kl: torch.Tensor | None
    nll: torch.Tensor


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


def _chunk_terms(lm_head: nn.Module, base_head: nn.Module | None, hidden: torch.Tensor,
                 base_hidden: torch.Tensor | None, targets: torch.Tensor, objective: TokenObjective):
    """One chunk's per-position NLL, token weights (`objective`; ones for `nll`) and KL(p_tuned || p_base) =
    sum_v p_t(v) (log p_t(v) - log p_b(v)) (zeros without a base), all fp32."""
    logits = lm_head(hidden).float()
    if base_head is None:
        nll = F.cross_entropy(logits, targets, reduction="none")
        kl = torch.zeros_like(nll)
    else:
        logp = F.log_softmax(logits, dim=-1)
        with torch.no_grad():
            logp_base = F.log_softmax(base_head(base_hidden).float(), dim=-1)
        nll = -logp.gather(1, targets.unsqueeze(1)).squeeze(1)
        kl = (logp.exp() * (logp - logp_base)).sum(-1)
    tw = objective.token_weights(logits, nll)
    return nll, torch.ones_like(nll) if tw is None else tw, kl


def chunked_objective_sums(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor,
                           weights: torch.Tensor | None = None, chunk_size: int = 1024,
                           objective: TokenObjective = TokenObjective(), base_hidden: torch.Tensor | None = None,
                           base_head: nn.Module | None = None) -> LossSums:
    """`LossSums` over positions t whose next label labels[t+1] is not -100: sum of example weight x token weight
    (`objective`) x NLL, sum of example weights, with a base model (`base_hidden` [B, T, H], no gradient, and
    `base_head`) the example-weighted sum of KL(p_tuned || p_base), and the example-weighted plain NLL.

    Each chunk of `chunk_size` positions runs under `torch.utils.checkpoint` (its logits, and the base's, are
    recomputed in backward, never kept); token weights are computed from the chunk's own logits, detached.
    """
    keep, y, w = _trained_positions(hidden, labels, weights, chunk_size)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    hb = None
    if base_hidden is not None:
        if base_hidden.shape != hidden.shape:
            raise ValueError(f"base hidden states {tuple(base_hidden.shape)} differ from {tuple(hidden.shape)}")
        hb = base_hidden.detach().to(hidden.device).reshape(-1, hidden.shape[-1]).index_select(0, keep)
    grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in lm_head.parameters()))
    sums = [torch.zeros((), dtype=torch.float32, device=hidden.device) for _ in range(3)]  # objective, KL, NLL
    for s in range(0, max(len(y), 1), chunk_size):
        args = (lm_head, base_head, h[s:s + chunk_size], None if hb is None else hb[s:s + chunk_size],
                y[s:s + chunk_size], objective)
        nll, tw, kl = checkpoint(_chunk_terms, *args, use_reentrant=False) if grad else _chunk_terms(*args)
        ew = torch.ones_like(nll) if w is None else w[s:s + chunk_size]
        sums = [sums[0] + (nll * tw * ew).sum(), sums[1] + (kl * ew).sum(), sums[2] + (nll.detach() * ew).sum()]
    weight_sum = w.sum() if w is not None else torch.tensor(float(len(y)), device=hidden.device)
    return LossSums(sums[0], weight_sum, None if base_head is None else sums[1], sums[2])


def chunked_ce_kl_sum(hidden: torch.Tensor, lm_head: nn.Module, base_hidden: torch.Tensor, base_head: nn.Module,
                      labels: torch.Tensor, weights: torch.Tensor | None = None,
                      chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`chunked_ce_sum` plus the (weighted) sum of KL(p_tuned || p_base) over the same trained positions.

    base_hidden [B, T, H]: the base model's last hidden states for the same batch (no gradient); base_head its LM
    head. Each chunk's base logits are computed inside the chunk (and recomputed in backward), never kept.
    """
    r = chunked_objective_sums(hidden, lm_head, labels, weights, chunk_size, base_hidden=base_hidden,
                               base_head=base_head)
    return r.objective, r.weight, r.kl


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
    r = sft_objective_sums(model, batch, TokenObjective(), kl=True, base_model=base_model, chunk_size=chunk_size)
    return r.objective, r.weight, r.kl


def sft_objective_sums(model: nn.Module, batch: dict, objective: TokenObjective, kl: bool = False,
                       base_model: nn.Module | None = None, chunk_size: int = 1024) -> LossSums:
    """`LossSums` of a collated batch under `objective`, with KL to the base model when `kl` (`base_model`: a
    frozen copy, or None for a peft model whose adapter is switched off for the base forward)."""
    base_hidden, base_head = base_hidden_states(model, batch, base_model) if kl else (None, None)
    hidden = model_hidden_states(model, batch)
    return chunked_objective_sums(hidden, output_head(model), batch["labels"], batch.get("weights"), chunk_size,
                                  objective, base_hidden, base_head)
