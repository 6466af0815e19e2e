"""What one forward of training computes: the model and its objective in one module, so DDP/FSDP wrap a single
module. The NLL part is a function passed in (`loss`, default `loss.sft_loss_sum`), so a benchmark or test can
run another one through the same recipe."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .loss import sft_kl_loss_sum, sft_loss_sum

LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (model, batch, chunk_size) -> (NLL sum, weight sum)


class SFTLossModule(torch.nn.Module):
    """Model + chunked trained-token loss in one forward.

    Returns `(NLL sum, weight sum, KL sum or None)`. With `kl`, the base model's forward runs in here too
    (no gradient): `base_model` is a frozen copy (full fine-tuning), or None for a peft model whose adapter is
    disabled for that forward.
    """

    def __init__(self, model, chunk_size: int, kl: bool = False, base_model=None, loss: LossFn = sft_loss_sum):
        super().__init__()
        self.model, self.chunk_size, self.kl, self.base_model, self.loss = model, chunk_size, kl, base_model, loss

    def forward(self, batch: dict, kl: bool = True):
        if self.kl and kl:
            return sft_kl_loss_sum(self.model, batch, self.base_model, chunk_size=self.chunk_size)
        return (*self.loss(self.model, batch, chunk_size=self.chunk_size), None)
