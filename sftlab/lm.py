"""Response-token NLL of a causal LM: the one definition training, validation, the audit and evaluation share.

Labels follow the HF convention (unshifted; -100 = not scored): position t predicts labels[t+1], and the
NLL of a token is the natural-log cross-entropy of the fp32 logits at the position before it.

The model is split into its body (the transformer, returning last hidden states after the final norm) and
its head (the output projection), and the head runs only at the scored positions, `chunk_size` of them at
a time: the full-vocabulary logits of prompt tokens are never needed (4k tokens x 49k vocab x fp32 is
800 MB). `trained_positions` and `nll_chunks` are the per-position core; `train.loss` adds weights and
gradient checkpointing, `response_nll` adds per-example sums and pooled hidden states without gradients.

The split works for any HF causal LM whose head is a plain projection, and for a peft-wrapped one: LoRA
layers live inside the body's modules, so calling the body of the unwrapped base model keeps them active.
Models whose logits are more than that (soft-capping, scaling: `Logits`) get it applied inside each chunk;
`split_matches_logits` checks once per model that body + head give the model's own logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from typing import TYPE_CHECKING

from .data.tokenize import IGNORE

if TYPE_CHECKING:  # torch is imported where it is used: GEN_MARGIN's importers (evaluation planning) stay light
    import torch
    from torch import nn

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
GEN_MARGIN = 16  # greedy answers scored against a reference may run this many tokens past its length


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(model: nn.Module, without_adapter: bool = False) -> nn.Module:
    """The LM head of an HF causal LM (peft-wrapped or not) with the model's logit post-processing
    (`sftlab.head`): hidden states in, the model's own logits out. without_adapter: a head with a LoRA adapter of
    its own gives its base layer (the base model's logits, also on backward's recompute)."""
    from .head import logit_postprocessing, with_postprocessing

    base = base_model(model)
    proj = base.get_output_embeddings()
    if proj is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (not a causal LM?)")
    if without_adapter:
        proj = getattr(proj, "base_layer", proj)
    return with_postprocessing(proj, logit_postprocessing(base))


def decoder_body(model: nn.Module) -> nn.Module | None:
    """The decoder body (the transformer up to its final norm) of an HF causal LM: `get_decoder()`, or its
    `model` attribute where `get_decoder` cannot tell (Llama-4's text model); None if there is none."""
    from torch import nn

    base = base_model(model)
    body = base.get_decoder() if hasattr(base, "get_decoder") else None
    if body is None or body is base:
        body = getattr(base, "model", None)
    return body if isinstance(body, nn.Module) and body is not base else None


def splits_into_body_and_head(model: nn.Module) -> bool:
    """Whether the model has a decoder body and an output head to split into (`modelcheck` checks that body +
    head give the model's own logits)."""
    base = base_model(model)
    return base.get_output_embeddings() is not None and decoder_body(base) is not None


@contextmanager
def attention_as(model: nn.Module, name: str | None):
    """The model (peft-wrapped or not) with attention implementation `name` inside the block, its own after it
    (None: unchanged). transformers' `set_attn_implementation`, the public switch."""
    base = base_model(model)
    own = base.config._attn_implementation
    if name is None or name == own:
        yield model
        return
    base.set_attn_implementation(name)
    try:
        yield model
    finally:
        base.set_attn_implementation(own)


def model_inputs(model: nn.Module, batch: dict) -> dict:
    """input_ids / attention_mask / position_ids of a collated batch, on the model's device."""
    device = base_model(model).get_input_embeddings().weight.device
    return {k: batch[k].to(device) for k in MODEL_INPUTS if batch.get(k) is not None}


def model_hidden_states(model: nn.Module, batch: dict) -> torch.Tensor:
    """Last hidden states [B, T, H] of the model body (no LM head) for a collated batch.

    Passes only input_ids / attention_mask / position_ids (moved to the model's device) and `use_cache=False`:
    with a cache, transformers skips packed-sequence detection and packed examples would attend to each other.
    """
    body = decoder_body(model)
    if body is None:
        raise ValueError(f"cannot find the decoder body of {type(base_model(model)).__name__}")
    return body(**model_inputs(model, batch), use_cache=False).last_hidden_state


def trained_positions(labels: torch.Tensor, weights: torch.Tensor | None = None, device=None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Flat indices (into [B*T]) of the positions whose next label is scored, those next labels, and the
    weights of those labels (None: unweighted). labels, weights: [B, T], unshifted."""
    import torch

    labels = labels.to(device)
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]  # position t predicts token t+1
    targets = targets.reshape(-1)
    keep = (targets != IGNORE).nonzero().squeeze(1)
    y = targets.index_select(0, keep)
    w = None
    if weights is not None:
        w = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        w[:, :-1] = weights.to(labels.device, torch.float32)[:, 1:]
        w = w.reshape(-1).index_select(0, keep)
    return keep, y, w


def _nll(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    logits = lm_head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="none")


def nll_chunks(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int
               ) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, per-position fp32 NLL) for `chunk_size` rows of `hidden` [N, H] at a time: the head and the
    cross-entropy never see more. Under gradients each chunk runs under `torch.utils.checkpoint`, so backward
    recomputes one chunk's logits instead of keeping all of them. At least one (possibly empty) chunk, so a
    sum over them stays connected to `hidden` and the head's parameters."""
    import torch
    from torch.utils.checkpoint import checkpoint

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in lm_head.parameters()))
    for s in range(0, max(len(targets), 1), chunk_size):
        hc, yc = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        yield s, checkpoint(_nll, lm_head, hc, yc, use_reentrant=False) if grad else _nll(lm_head, hc, yc)


@dataclass
class ResponseNll:
    """Per sequence of a batch (a row of a padded batch, a segment of a packed one): NLL summed over its scored
    tokens (fp64), their number, and optionally the last hidden state mean-pooled over its tokens (fp32 [N, H])."""

    sums: torch.Tensor
    counts: torch.Tensor
    pooled: torch.Tensor | None = None

    @property
    def means(self) -> list[float]:
        return [s / n if n else float("nan") for s, n in zip(self.sums.tolist(), self.counts.tolist())]


def _sequence_ids(batch: dict, device) -> tuple[torch.Tensor, int]:
    """For every flat position of the batch [B*T], the sequence it belongs to, and the number of sequences:
    rows of a right-padded batch (`collate_padded`), segments of a packed row (`collate_packed`, `seq_lens`)."""
    import torch

    b, t = batch["labels"].shape
    if batch.get("seq_lens") is not None:
        if b != 1:
            raise ValueError("a packed batch is one row")
        lens = torch.tensor(batch["seq_lens"], device=device)
        return torch.repeat_interleave(torch.arange(len(lens), device=device), lens), len(lens)
    return torch.arange(b, device=device).repeat_interleave(t), b


def response_nll(model: nn.Module, batch: dict, chunk_size: int = 1024, pool: bool = False,
                 head_only: bool | None = None) -> ResponseNll:
    """Response-token NLL of every sequence of a collated batch, without gradients: the rows of a right-padded
    batch (`collate_padded`) or the segments of a packed row (`collate_packed`; the model's attention must keep
    them apart: `segments`, or flash-attention's varlen path).

    The scored tokens are those with labels != -100. head_only: run the head on the scored positions only
    (None: wherever `splits_into_body_and_head`); False: the model's own full forward, logits gathered there.
    pool: each sequence's last hidden state averaged over its real tokens.
    """
    import torch
    from torch import nn

    with torch.inference_mode():
        if head_only is None:
            head_only = splits_into_body_and_head(model)
        if head_only:
            hidden, head = model_hidden_states(model, batch), output_head(model)
        else:
            out = model(**model_inputs(model, batch), use_cache=False, output_hidden_states=True)
            hidden, head = out.hidden_states[-1], None
        b, t = batch["labels"].shape
        seq, n_seq = _sequence_ids(batch, hidden.device)
        keep, y, _ = trained_positions(batch["labels"], device=hidden.device)
        rows = seq.index_select(0, keep)
        if head is not None:
            chunks = nll_chunks(head, hidden.reshape(b * t, -1).index_select(0, keep), y, chunk_size)
        else:
            logits = out.logits.reshape(b * t, -1).index_select(0, keep)
            chunks = nll_chunks(nn.Identity(), logits, y, chunk_size)
        sums = torch.zeros(n_seq, dtype=torch.float64, device=hidden.device)
        for s, nll in chunks:
            sums.index_add_(0, rows[s:s + len(nll)], nll.double())
        counts = torch.bincount(rows, minlength=n_seq)
        pooled = None
        if pool:
            flat = hidden.reshape(b * t, -1).float()
            if batch.get("attention_mask") is not None:
                real = batch["attention_mask"].to(hidden.device).reshape(-1).bool()
                flat, seq = flat[real], seq[real]
            pooled = torch.zeros(n_seq, flat.shape[1], device=hidden.device).index_add_(0, seq, flat)
            pooled = (pooled / torch.bincount(seq, minlength=n_seq).clamp(min=1)[:, None]).cpu()
        return ResponseNll(sums.cpu(), counts.cpu(), pooled)


def head_matches_logits(model: nn.Module, batch: dict, tol: float = 1e-3) -> bool:
    """Whether body + head reproduce the model's own logits on `batch` (fp32): a one-time check of the split."""
    import torch

    if not splits_into_body_and_head(model):
        return False
    with torch.inference_mode():
        full = model(**model_inputs(model, batch), use_cache=False).logits.float()
        mine = output_head(model)(model_hidden_states(model, batch)).float()
    return torch.allclose(full, mine, atol=tol, rtol=tol)
