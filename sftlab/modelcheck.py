"""One-time checks that sftlab's training and scoring path computes the model's own function.

sftlab does not run a causal LM the way its `forward` does: the body and the head are called separately (the head
only at scored positions, with the model's logit post-processing, `sftlab.head`), examples are packed into rows
or right-padded, and on CPU attention is `segments` (`sftlab.attention`). Each is exact by construction for the
families sftlab knows (tests/test_families.py); a family it does not know may do something none of them
expects (a mask-only attention pattern, a state-space layer that ignores packing, logits scaled elsewhere). So
before training, `check_training_path` runs a short probe of two sequences both ways: each alone through the
model's own `forward` with eager attention (transformers' reference), and together as sftlab batches them
(packed in one row, or right-padded), through body + head with the attention chosen. A mismatch is an error
naming the model and the part that differs, never a silently different loss.

The probe is short (`PROBE_LENGTHS` tokens, longer where the model has a small sliding window), so it cannot
see features that act only over thousands of tokens; those are handled by construction (sliding windows,
soft-capping and sinks are implemented by `segments`), and `auto` does not choose `segments` for attention
patterns it does not implement (`sftlab.models.segments_unsupported`).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import SegmentsError
from .lm import attention_as, base_model, model_hidden_states, output_head, splits_into_body_and_head

PROBE_LENGTHS = (13, 9)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}  # relative to the logits' magnitude; others: 3e-2


class ModelCheckError(ValueError):
    """sftlab's path would compute something other than the model's own forward."""


def probe_lengths(config) -> tuple[int, int]:
    """Two sequence lengths that reach past the model's sliding window where it is short."""
    window = getattr(config, "sliding_window", None)
    extra = window + 3 if isinstance(window, int) and 0 < window < 256 else 0
    return max(PROBE_LENGTHS[0], extra), max(PROBE_LENGTHS[1], extra - 4)


def _probe(config, device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    vocab = int(getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                        "vocab_size", 1000))
    return [torch.randint(0, vocab, (n,), generator=g).to(device) for n in probe_lengths(config)]


def _as_batch(seqs: list[torch.Tensor], packed: bool) -> dict:
    if packed:
        return {"input_ids": torch.cat(seqs)[None],
                "position_ids": torch.cat([torch.arange(len(s), device=s.device) for s in seqs])[None]}
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long, device=seqs[0].device)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, :len(s)], mask[r, :len(s)] = s, 1
    pos = torch.arange(width, device=ids.device).expand(len(seqs), -1)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


def _rows(logits: torch.Tensor, seqs: list[torch.Tensor], packed: bool) -> list[torch.Tensor]:
    if packed:
        return list(logits[0].split([len(s) for s in seqs]))
    return [logits[r, :len(s)] for r, s in enumerate(seqs)]


def _differs(got: list[torch.Tensor], ref: list[torch.Tensor], dtype: torch.dtype) -> float | None:
    tol = TOLERANCE.get(dtype, 3e-2)
    scale = max(float(r.abs().max()) for r in ref) + 1.0
    worst = max(float((g.float() - r.float()).abs().max()) for g, r in zip(got, ref)) / scale
    return worst if worst > tol else None


def check_training_path(model: nn.Module, packed: bool) -> None:
    """Raise `ModelCheckError` unless body + head with the model's attention, on a packed row (packed) or
    right-padded rows, give each probe sequence the logits of the model's own eager forward on it alone."""
    base = base_model(model)
    name = type(base).__name__
    if not splits_into_body_and_head(base):
        raise ModelCheckError(f"{name}: cannot split into a decoder body and an output head (get_decoder / "
                              f"get_output_embeddings); sftlab's chunked loss needs both")
    param = next(base.parameters())
    seqs = _probe(base.config, param.device)
    attn = base.config._attn_implementation
    was_training = base.training
    base.eval()
    try:
        with torch.inference_mode():
            try:
                split = output_head(base)(model_hidden_states(base, _as_batch(seqs, packed)))
            except SegmentsError as e:
                raise ModelCheckError(f"{name}: {e}") from e
            if attn != "eager":
                base.set_attn_implementation("eager")
            try:
                ref = [base(input_ids=s[None], use_cache=False).logits[0] for s in seqs]
                own = base(**_as_batch(seqs[:1], packed=False), use_cache=False).logits[0]
                own_split = output_head(base)(model_hidden_states(base, _as_batch(seqs[:1], packed=False)))[0]
            finally:
                if attn != "eager":
                    base.set_attn_implementation(attn)
    finally:
        base.train(was_training)
    head = _differs([own_split], [own], param.dtype)
    if head is not None:
        raise ModelCheckError(f"{name}: its logits are more than its output head's (relative difference "
                              f"{head:.1e} on a probe): sftlab does not know this family's logit post-processing "
                              f"(sftlab/head.py); it cannot train or score it exactly")
    diff = _differs(_rows(split, seqs, packed), ref, param.dtype)
    if diff is not None:
        layout = "packed rows" if packed else "right-padded rows"
        raise ModelCheckError(f"{name}: with attention {attn!r} on {layout}, its logits differ from its own eager "
                              f"forward by {diff:.1e} (relative, on a probe of {len(seqs)} sequences); "
                              + ("set model.attn_implementation=eager or sdpa" if attn == "segments" else
                                 "this model does not keep packed examples apart: set train.batching=length_grouped"
                                 if packed else "set model.attn_implementation=eager"))


def scoring_attention(model: nn.Module) -> str | None:
    """The attention for no-gradient scoring (audit, evaluation NLL): `segments` on CPU for a model it reproduces on
    packed rows (checked here once, as before training), else None (the model's own attention). The model's
    own attention is left in place: callers switch with `sftlab.lm.attention_as` around their scoring forwards, since
    generation needs a mask that `segments` does not take."""
    from .attention import register
    from .models import segments_unsupported

    base = base_model(model)
    if next(base.parameters()).device.type != "cpu" or segments_unsupported(base.config):
        return None
    if not getattr(base, "_can_set_attn_implementation", lambda: False)():
        return None
    name = register()
    try:
        with attention_as(base, name):
            check_training_path(base, packed=True)
    except (ModelCheckError, ValueError):
        return None
    return name
