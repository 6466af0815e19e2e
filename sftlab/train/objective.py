"""What one forward of training computes: the model and its objective in one module, so DDP/FSDP wrap a single
module. The plain-NLL part is a function passed in (`loss`, default `loss.sft_loss_sum`), so a benchmark or test can
run another one through the same recipe; token-weighted objectives (`train.objective`: dft, eaft) and the KL term
go through `loss.sft_objective_sums`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .loss import LossSums, TokenObjective, sft_loss_sum, sft_objective_sums

LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (model, batch, chunk_size) -> (NLL sum, weight sum)


class SFTLossModule(torch.nn.Module):
    """Model + chunked trained-token loss in one forward.

    Returns `LossSums(objective, weight, kl or None, nll)`. With `kl`, the base model's forward runs in here too
    (no gradient): `base_model` is a frozen copy (full fine-tuning), or None for a peft model whose adapter is
    disabled for that forward. `forward(batch, kl=False, weighted=False)` is the plain NLL (validation).
    """

    def __init__(self, model, chunk_size: int, kl: bool = False, base_model=None, loss: LossFn = sft_loss_sum,
                 objective: TokenObjective = TokenObjective()):
        super().__init__()
        self.model, self.chunk_size, self.kl, self.base_model, self.loss = model, chunk_size, kl, base_model, loss
        self.objective = objective

    def forward(self, batch: dict, kl: bool = True, weighted: bool = True) -> LossSums:
        use_kl = self.kl and kl
        objective = self.objective if weighted else TokenObjective()
        if use_kl or objective.kind != "nll":
            return sft_objective_sums(self.model, batch, objective, use_kl, self.base_model, self.chunk_size)
        total, weight = self.loss(self.model, batch, chunk_size=self.chunk_size)
        return LossSums(total, weight, None, total.detach())
