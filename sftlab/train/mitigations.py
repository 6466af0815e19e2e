"""Forgetting mitigations (docs/training.md, "Mitigations"), each off by default.

- replay (`train.replay`): a pool of general examples mixed into the batch plan (`plan.epoch_batches`);
- KL to base (`train.kl_to_base`): λ·KL(p_tuned || p_base) per trained token inside the chunked loss; the
  reference is a frozen copy of the model before training (full fine-tuning) or the peft model with its adapter
  disabled (LoRA: no copy);
- L2-SP (`train.l2_to_base`): the exact gradient of λ·||θ-θ0||², added once per optimizer step.
"""

from __future__ import annotations

import copy
import dataclasses
import random

import torch

from ..config import RunConfig
from ..config import DataConfig
from ..data.pipeline import DataReport, iter_examples
from ..data.tokenize import Example
from .plan import MicroBatchStream, trained_weight
from .precision import MasterWeights


def prepare_replay(cfg: RunConfig, tokenizer, opts: DataConfig) -> tuple[list[Example], DataReport | None]:
    """The replay pool: train.replay.data through the same data layer and options (`opts`, the training data's),
    every example labelled train.replay.task (its own format detection; no task field or map)."""
    r = cfg.train.replay
    if r is None:
        return [], None
    opts = opts.model_copy(update={"format": r.format, "task_field": None, "task_map": None})
    report = DataReport()
    try:
        pool = [dataclasses.replace(ex, task=r.task) for ex in iter_examples(r.data, tokenizer, opts, report)]
    except FileNotFoundError as e:
        raise FileNotFoundError(f"train.replay.data: {e}") from None
    if not pool:
        raise ValueError(f"train.replay.data: no replay examples left after validation and truncation ({r.data})")
    if r.limit is not None and r.limit < len(pool):
        keep = sorted(random.Random(f"replay-limit:{cfg.train.seed}").sample(range(len(pool)), r.limit))
        pool = [pool[i] for i in keep]
    return pool, report


def needs_base_copy(cfg: RunConfig) -> bool:
    """KL to base needs a frozen copy of the base model only for full fine-tuning: LoRA disables its adapter."""
    return cfg.train.kl_to_base > 0 and not cfg.lora.enabled


def frozen_copy(model):
    """The model before training, as the KL reference for full fine-tuning: same dtype, eval mode, no grad."""
    base = copy.deepcopy(model).eval()
    base.requires_grad_(False)
    return base


def l2_anchor(model, base_model=None, master: MasterWeights | None = None) -> dict[str, torch.Tensor]:
    """θ0 of L2-SP on the parameters' own device and dtype: the trainable weights before training (the frozen
    base copy's tensors when there is one and they are exact; for LoRA the adapter's initialisation). With
    fp32 master weights, θ0 is the masters' initial values."""
    if master:
        return {n: p.detach().clone() for n, p in master.named().items()}
    base = dict(base_model.named_parameters()) if base_model is not None else {}
    return {n: base[n].detach() if n in base and base[n].shape == p.shape else p.detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def add_l2_grad(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], lam: float) -> float:
    """Add the exact gradient 2λ(θ-θ0) of λ·||θ-θ0||² to every anchored parameter's .grad; return the penalty."""
    from .sharding import is_sharded

    sq = torch.zeros((), dtype=torch.float64)
    shards = torch.zeros((), dtype=torch.float64)  # FSDP: this process's part of the sum over sharded parameters
    with torch.no_grad():
        for n, p in params.items():
            if n not in anchor:
                continue
            d = p - anchor[n]
            if is_sharded(d):
                shards += d.to_local().double().pow(2).sum().cpu()
            else:
                sq += d.double().pow(2).sum().cpu()
            g = d.mul(2 * lam)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
    if any(is_sharded(p) for p in params.values()):
        import torch.distributed as dist

        dist.all_reduce(shards)  # gloo and NCCL both sum float64 on the CPU / device it lives on
        sq += shards
    return lam * float(sq)


def replay_share(group: list[list[int]], pool: list[Example], n_train: int) -> dict:
    """The replay examples and their trained tokens in one optimizer step's micro-batches."""
    replayed = [pool[j] for b in group for j in b if j >= n_train]
    return {"replay_examples": len(replayed), "replay_tokens": trained_weight(replayed)}


def replay_counts(stream: MicroBatchStream, steps: int, pool: list[Example], n_train: int, report: DataReport,
                  fingerprint: str) -> dict:
    """Replay examples and trained tokens in the steps run (resumed runs included), vs the task data's."""
    weight: dict[int, float] = {}

    def w(j: int) -> float:
        if j not in weight:
            weight[j] = trained_weight([pool[j]])
        return weight[j]

    drawn, task_tokens = [], 0.0
    for k in range(steps):
        for b in stream.step(k):
            drawn += [j for j in b if j >= n_train]
            task_tokens += sum(w(j) for j in b if j < n_train)
    tokens = sum(w(j) for j in drawn)
    return {"pool_examples": len(pool) - n_train, "trained_examples": len(drawn),
            "distinct_examples": len(set(drawn)), "trained_tokens": tokens,
            "token_share": tokens / (tokens + task_tokens) if tokens + task_tokens else 0.0,
            "data_fingerprint": fingerprint, "data": report.as_dict()}


def mitigations_note(cfg: RunConfig, n_replay: int) -> str:
    t, parts = cfg.train, []
    if t.replay is not None:
        parts.append(f"replay {t.replay.ratio:.0%} of {n_replay} examples")
    if t.kl_to_base:
        parts.append(f"KL to base λ={t.kl_to_base:g}")
    if t.l2_to_base:
        parts.append(f"L2-SP λ={t.l2_to_base:g}")
    objective = {"dft": "DFT", "eaft": f"EAFT k={t.eaft_top_k} α={t.eaft_alpha:g}"}.get(t.objective)
    note = f"; objective {objective}" if objective else ""
    return note + (f"; mitigations: {', '.join(parts)}" if parts else "")
