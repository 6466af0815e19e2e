"""A causal LM's output head as the model defines it: the projection, then the model's logit post-processing.

sftlab runs the head itself, on the scored positions only and in chunks (`sftlab.lm`), so whatever the model's
own forward does to its logits after the projection must happen here too, or the loss silently differs.
Families do one of three things (transformers' `*ForCausalLM.forward`): multiply (Cohere `logit_scale`,
Falcon-H1 `lm_head_multiplier`), divide (Granite `logits_scaling`), or soft-cap (Gemma-2/3
`final_logit_softcapping`: tanh(logits / c) * c). `Logits` reads them from the model and applies them in the
same order and form. A model doing anything else is caught by `sftlab.lm.split_matches_logits`, which compares
body + head with the model's own forward once per model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Logits:
    """logits * multiply, then / divide, then tanh(logits / softcap) * softcap; None: that step is skipped."""
    multiply: float | None = None
    divide: float | None = None
    softcap: float | None = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def describe(self) -> str:
        parts = [f"x {self.multiply:g}" if self.multiply is not None else "",
                 f"/ {self.divide:g}" if self.divide is not None else "",
                 f"soft-cap {self.softcap:g}" if self.softcap is not None else ""]
        return ", ".join(p for p in parts if p) or "none"


def _setting(value) -> float | None:
    return None if value is None else float(value)


def logit_postprocessing(model: nn.Module) -> Logits:
    """The `Logits` of a transformers causal LM (not peft-wrapped), from the attributes its forward reads."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    multiply = _setting(getattr(model, "logit_scale", getattr(cfg, "logit_scale", None)))
    if multiply is None:
        multiply = _setting(getattr(getattr(model, "model", None), "lm_head_multiplier", None))
    return Logits(multiply=multiply, divide=_setting(getattr(cfg, "logits_scaling", None)),
                  softcap=_setting(getattr(cfg, "final_logit_softcapping", None)))


class PostProcessedHead(nn.Module):
    """proj(hidden) followed by the model's `Logits` post-processing."""

    def __init__(self, proj: nn.Module, post: Logits):
        super().__init__()
        self.proj, self.post = proj, post

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.post.apply(self.proj(hidden))


def with_postprocessing(proj: nn.Module, post: Logits) -> nn.Module:
    """`proj` itself when `post` does nothing, else `PostProcessedHead(proj, post)`."""
    return proj if post == Logits() else PostProcessedHead(proj, post)
