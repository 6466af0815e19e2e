"""A running forgetting proxy: KL(p_base ‖ p_tuned) per token on fixed probe sets, logged with the eval loss.

"RL's Razor" (Shenfeld et al. 2025, arXiv 2509.04259) finds that how far the tuned model's next-token
distribution has moved from the base model's — the forward KL E[KL(p_base ‖ p_tuned)] on the new task's inputs —
predicts how much it forgets. `train.drift_examples: N` measures it during training on up to two fixed sets:
- `heldout`: N examples of the validation set (else a seeded sample of the training examples, named `train`),
  over their trained positions (the responses);
- `general`: with `train.drift_general` (QA files: question/answer, as `sftlab eval --general` reads them), N
  questions each with its first gold answer as the reply, over the answer's positions.

The base distributions are fixed when training starts, so the probe keeps only what it needs to recompute them:
the base model's last hidden states at the probe's scored positions ([positions × hidden], a few MB) and a
frozen copy of its output head — not a second model. At every validation (`train.eval_every`), and at the start
and the end, the current model's hidden states at the same positions give its distributions, and the KL is
computed in chunks of `train.loss_chunk_size` positions (never a [tokens × vocab] tensor). At step 0 it is 0 up to
rounding (LoRA starts as the base; a resumed run rebuilds the probe from the weights as loaded, the base's,
before the checkpoint is restored).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.packing import collate_padded, length_batches
from ..data.tokenize import Example
from ..lm import model_hidden_states, output_head, trained_positions


@dataclass
class ProbeBatch:
    batch: dict
    keep: torch.Tensor  # flat indices of the scored positions
    base_hidden: torch.Tensor  # the base model's last hidden states there [positions, H]


@dataclass
class DriftProbe:
    sets: dict[str, list[ProbeBatch]]
    base_head: nn.Module
    chunk_size: int


def probe_examples(eval_ex: list[Example], train_ex: list[Example], n: int, seed: int) -> tuple[str, list[Example]]:
    """The held-out probe set: the first `n` validation examples in a seeded order, else `n` training examples."""
    name, pool = ("heldout", eval_ex) if eval_ex else ("train", train_ex)
    order = list(range(len(pool)))
    random.Random(f"{seed}:drift").shuffle(order)
    return name, [pool[i] for i in sorted(order[:n])]


def build_probe(model: nn.Module, sets: dict[str, list[Example]], pad_id: int, chunk_size: int,
                batch_tokens: int = 4096) -> DriftProbe:
    """The base model's hidden states at each set's scored positions and a frozen copy of its head; `model` is
    the model before any update (call it before training, and before a checkpoint is restored)."""
    was_training = model.training
    model.eval()
    out: dict[str, list[ProbeBatch]] = {}
    with torch.no_grad():
        for name, examples in sets.items():
            out[name] = []
            for idx in length_batches([len(ex.input_ids) for ex in examples], batch_tokens):
                batch = collate_padded([examples[i] for i in idx], pad_id)
                hidden = model_hidden_states(model, batch)
                keep, _, _ = trained_positions(batch["labels"], None, device=hidden.device)
                out[name].append(ProbeBatch(batch, keep,
                                            hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep).clone()))
    head = copy.deepcopy(output_head(model)).requires_grad_(False).eval()
    model.train(was_training)
    return DriftProbe(out, head, chunk_size)


def drift_kl(model: nn.Module, probe: DriftProbe) -> dict[str, float]:
    """Per probe set: mean KL(p_base ‖ p_tuned) over its scored positions, in nats per token."""
    was_training = model.training
    model.eval()
    head = output_head(model)
    result = {}
    with torch.no_grad():
        for name, batches in probe.sets.items():
            total, count = 0.0, 0
            for pb in batches:
                hidden = model_hidden_states(model, pb.batch)
                h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pb.keep)
                for s in range(0, len(pb.keep), probe.chunk_size):
                    logp = F.log_softmax(head(h[s:s + probe.chunk_size]).float(), dim=-1)
                    logp_base = F.log_softmax(probe.base_head(pb.base_hidden[s:s + probe.chunk_size]).float(), dim=-1)
                    total += float((logp_base.exp() * (logp_base - logp)).sum())
                count += len(pb.keep)
            result[name] = total / count if count else float("nan")
    model.train(was_training)
    return result
