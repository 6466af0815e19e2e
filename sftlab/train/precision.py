"""`train.precision: bf16-master`: bf16 weights, activations and gradients; fp32 master weights and AdamW state.

Under bf16 autocast (`precision: bf16`) the weights stay fp32 and every matmul input is cast to bf16 on the fly;
the residual stream, norms and their saved activations stay fp32, and the casts themselves cost time (on CPU a
large share of a step: docs/benchmarks.md). Here the model itself is bf16, so activations and their gradients
are bf16 end to end, while the optimizer works on fp32 copies of the trainable parameters ("master weights"):

    backward (bf16 grads) -> add them into the fp32 masters' .grad -> clip, AdamW step on the masters (fp32)
    -> copy the masters back into the bf16 model

Updates smaller than bf16's resolution therefore accumulate in the masters instead of being rounded away (a
plain bf16 model with a small learning rate would not move). Checkpoints store the masters (fp32), so resume
is exact; the final model is saved from the masters, in fp32. The masters start from the weights as loaded
(fp32 by default), before the model is cast to bf16.

Gradients of one micro-batch are moved into the fp32 masters right after its backward (so accumulation over
micro-batches is in fp32), except under DDP, where the bf16 gradients accumulate until the last micro-batch's
all-reduce.
"""

from __future__ import annotations

import torch
from torch import nn


class MasterWeights:
    """fp32 copies of a model's trainable parameters, paired with the (bf16) parameters they drive."""

    def __init__(self, model: nn.Module):
        self.names: list[str] = []
        self.model_params: list[nn.Parameter] = []
        self.params: list[nn.Parameter] = []
        for name, p in model.named_parameters():  # tied weights are listed once
            if p.requires_grad:
                self.names.append(name)
                self.model_params.append(p)
                self.params.append(nn.Parameter(p.detach().to(torch.float32, copy=True)))

    def named(self) -> dict[str, nn.Parameter]:
        return dict(zip(self.names, self.params))

    def take_grads(self) -> None:
        """Add the model's gradients into the masters' (fp32) and free the model's."""
        with torch.no_grad():
            for m, p in zip(self.params, self.model_params):
                if p.grad is None:
                    continue
                if m.grad is None:
                    m.grad = p.grad.to(torch.float32)
                else:
                    m.grad.add_(p.grad)
                p.grad = None

    def to_model(self) -> None:
        """Copy the masters into the model's parameters (rounded to their dtype; exact once cast to fp32)."""
        with torch.no_grad():
            for m, p in zip(self.params, self.model_params):
                p.copy_(m)


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating-point parameters in place; buffers (rotary inv_freq and the like) keep their dtype."""
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    return model
