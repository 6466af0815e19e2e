"""FSDP2 for the recipe (`train.fsdp`): parameters, gradients and optimizer state sharded over the processes.

`shard` applies PyTorch's `fully_shard` (torch.distributed.fsdp, "FSDP2": per-parameter DTensor sharding on dim 0)
to every decoder layer and then to the model+loss module (`SFTLossModule`) as the root, so the root's forward —
the one entry point the loop calls — gathers the embeddings, final norm and head, and each layer gathers its own
weights just in time and frees them after (`reshard_after_forward`). Gradients are reduce-scattered (averaged over
processes, as DDP's all-reduce is, so the loop's loss scaling is the same). The chunked loss, the KL reference and
the token-weighted objectives run inside the root's forward and need nothing else. It runs wherever
`torch.distributed` runs: NCCL on GPUs, gloo on CPU processes (tested: 2 CPU processes equal 1 process with the
same global batch).

Checkpoints stay in the recipe's format plus one file per process: the trainable weights are gathered (`gathered`)
and written whole by rank 0 (`trainable.safetensors`, as without FSDP), each process writes its shard of the
optimizer state (`optimizer-RANK.pt`, local tensors); resuming copies each process's slice of the whole weights
into its shards (`load_sharded`) and its own optimizer file back into DTensors, so the weights after resume are
bit-equal to an uninterrupted run with the same number of processes. The final HF export gathers the weights
once more and rank 0 writes an ordinary model directory.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def shard(module: nn.Module, model: nn.Module, bf16_compute: bool = False) -> None:
    """fully_shard every decoder layer of `model`, then `module` (model + loss) as the root. `bf16_compute`
    (precision bf16-master): FSDP's own mixed precision — the fp32 shards are the master weights the optimizer
    steps, gathered as bf16 for forward and backward, gradients reduced and kept in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..lm import decoder_body

    body = decoder_body(model)
    layers = getattr(body, "layers", None)
    if layers is None:
        raise ValueError(f"train.fsdp: {type(model).__name__} has no decoder layers (body.layers) to shard")
    layer_kw, root_kw = {}, {}
    if bf16_compute:
        layer_kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
        # the root's inputs are the batch: its float tensors are loss weights, kept fp32
        root_kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                     cast_forward_inputs=False)}
    for layer in layers:
        fully_shard(layer, **layer_kw)
    fully_shard(module, **root_kw)


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@contextmanager
def gathered(module: nn.Module, reshard: bool = True):
    """Every FSDP module's parameters all-gathered into whole tensors for the block (every process takes part);
    `named_parameters()` gives the whole tensors inside it. `reshard=False` leaves them whole (the final export)."""
    mods = fsdp_modules(module)
    for m in mods:
        m.unshard()
    try:
        yield
    finally:
        if reshard:
            for m in mods:
                m.reshard()


def local_slice(full: torch.Tensor, like) -> torch.Tensor:
    """This process's part of the whole tensor `full`, laid out as the DTensor `like` holds it."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements).to_local()


def load_sharded(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into parameters, each process into its own shards (DTensors) or the whole parameter."""
    with torch.no_grad():
        for n, t in tensors.items():
            p = params[n]
            if is_sharded(p):
                p.to_local().copy_(local_slice(t, p))
            else:
                p.copy_(t)


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict with every DTensor replaced by this process's local tensor (for torch.save)."""
    sd = optimizer.state_dict()
    sd["state"] = {k: {n: v.to_local() if is_sharded(v) else v for n, v in s.items()} for k, s in sd["state"].items()}
    return sd


def restore_sharded_optimizer(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Load a `local_optimizer_state` back: each state tensor of a sharded parameter becomes a DTensor again."""
    from torch.distributed.tensor import DTensor

    optimizer.load_state_dict(sd)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_sharded(p):
                continue
            state = optimizer.state.get(p, {})
            for n, v in list(state.items()):
                if isinstance(v, torch.Tensor) and not is_sharded(v) and v.shape == p.to_local().shape:
                    state[n] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every sharded tensor gathered whole (every process takes part), on the CPU —
    what an HF `save_pretrained(state_dict=...)` writes, tied weights once. (An FSDP2 module's own state dict is
    sharded.)"""
    once = {n for n, _ in model.named_parameters()}  # a tied weight (head = embeddings) under its first name
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {k: (v.full_tensor() if is_sharded(v) else v).detach().cpu() for k, v in model.state_dict().items()
            if k in once or k not in every}


def scalar(x) -> float:
    """A float from a (possibly DTensor) scalar, e.g. the gradient norm of sharded gradients."""
    return float(x.full_tensor()) if is_sharded(x) else float(x)
