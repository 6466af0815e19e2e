"""The batch plan: which examples every micro-batch of every optimizer step holds, known before any tensor.

An epoch's plan is a pure function of (seed, epoch) (`epoch_batches`), so exact resume needs only the step
number. With a replay pool (train.replay), index len(examples) + j stands for replay example j, drawn as a pure
function of (seed, epoch, micro-batch). `MicroBatchStream` strings epochs together and hands each optimizer
step its micro-batches (all processes'); the recipe takes the epoch planner as an argument, so a benchmark or
test passes another one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch

from ..config import RunConfig
from ..data.packing import collate_packed, collate_padded, largest_first, length_grouped_batches, pack_best_fit
from ..data.prepared import lengths_of
from ..data.tokenize import IGNORE, Example

EpochPlanner = Callable[..., list[list[int]]]  # (examples, cfg, epoch, replay) -> micro-batches of indices


def replay_count(n: int, ratio: float) -> int:
    """Replay examples to add to n task examples so that they make up `ratio` of the whole (>= 1 if ratio > 0)."""
    return max(1, round(n * ratio / (1 - ratio))) if ratio > 0 else 0


def replay_draw(pool: int, k: int, seed: int, epoch: int, index: int) -> list[int]:
    """k indices into the replay pool, a pure function of (seed, epoch, micro-batch index): successive seeded
    permutations of the pool, so nothing repeats within a draw unless k > pool."""
    rng = random.Random(f"replay:{seed}:{epoch}:{index}")  # str seeds hash with sha512: same in every process
    out: list[int] = []
    while len(out) < k:
        out += rng.sample(range(pool), min(pool, k - len(out)))
    return out


def epoch_batches(examples: list[Example], cfg: RunConfig, epoch: int,
                  replay: list[Example] | None = None) -> list[list[int]]:
    """Micro-batches (lists of example indices) of one epoch, deterministic in (seed, epoch).

    With a replay pool, index len(examples) + j is replay[j]. length_grouped: every micro-batch of n task
    examples gets `replay_count(n, ratio)` replay examples drawn for (seed, epoch, micro-batch); packed: a
    sample of `replay_count(len(examples), ratio)` replay examples drawn for (seed, epoch) is packed with them.
    """
    t = cfg.train
    lengths = lengths_of(examples)
    n, ratio = len(examples), (t.replay.ratio if t.replay is not None and replay else 0.0)
    if t.batching == "packed":
        pool = list(range(n)) + [n + j for j in replay_draw(len(replay or ()), replay_count(n, ratio),
                                                                t.seed, epoch, -1)]
        length = {j: lengths[j] if j < n else len(replay[j - n].input_ids) for j in pool}
        rows = pack_best_fit([length[j] for j in pool], t.batch_tokens or cfg.data.max_length)
        rows = [[pool[i] for i in row] for row in rows]
        random.Random(t.seed * 1_000_003 + epoch).shuffle(rows)
        return largest_first(rows, [sum(length[j] for j in row) for row in rows])
    batches = length_grouped_batches(lengths, batch_tokens=t.batch_tokens, batch_size=t.batch_size, shuffle=True,
                                     seed=t.seed * 1_000_003 + epoch)
    if ratio > 0:
        batches = [b + [n + j for j in replay_draw(len(replay), replay_count(len(b), ratio), t.seed, epoch, i)]
                   for i, b in enumerate(batches)]
    return batches


class MicroBatchStream:
    """The global stream of micro-batches, epoch after epoch; optimizer step k owns items [k*n, (k+1)*n).

    Epochs have the same number of micro-batches, except packed batching with replay, where each epoch packs
    its own replay sample; the stream then keeps the length of every epoch it has planned.
    """

    def __init__(self, examples, cfg: RunConfig, per_step: int, world: int = 1, replay: list[Example] | None = None,
                 planner: EpochPlanner = epoch_batches):
        self.examples, self.cfg, self.per_step, self.replay = examples, cfg, per_step, replay or None
        self.planner = planner
        self._cache: dict[int, list[list[int]]] = {}
        self._lengths: list[int] = []  # micro-batches of epochs 0, 1, ...
        self.fixed = not (self.replay and cfg.train.batching == "packed")
        self.per_epoch = self._epoch_len(0)
        e = int(cfg.train.epochs)
        if self.fixed:
            self.total = max(1, int(round(cfg.train.epochs * self.per_epoch)))
        else:
            self.total = max(1, sum(self._epoch_len(k) for k in range(e))
                             + int(round((cfg.train.epochs - e) * self._epoch_len(e))))
        if cfg.train.max_steps:
            self.steps = cfg.train.max_steps
        else:
            n = math.ceil(self.total / per_step)
            # every process needs at least one micro-batch in a step (DDP syncs once per step)
            self.steps = n - 1 if n > 1 and self.total - (n - 1) * per_step < world else n

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._cache:
            extra = (self.replay,) if self.replay else ()
            self._cache = {epoch: self.planner(self.examples, self.cfg, epoch, *extra)}
        return self._cache[epoch]

    def _epoch_len(self, epoch: int) -> int:
        if self.fixed and self._lengths:
            return self._lengths[0]
        while len(self._lengths) <= epoch:
            self._lengths.append(len(self._epoch(len(self._lengths))))
        return self._lengths[epoch]

    def _batch(self, i: int) -> list[int]:
        epoch = 0
        while i >= self._epoch_len(epoch):
            i -= self._epoch_len(epoch)
            epoch += 1
        return self._epoch(epoch)[i]

    def step(self, k: int) -> list[list[int]]:
        lo, hi = k * self.per_step, (k + 1) * self.per_step
        if not self.cfg.train.max_steps:
            hi = min(hi, self.total)
        return [self._batch(i) for i in range(lo, hi)]


def collate(examples: list[Example], batching: str, pad_id: int) -> dict:
    """The model inputs of one micro-batch: packed rows or right-padded rows, tensors only."""
    batch = collate_packed(examples) if batching == "packed" else collate_padded(examples, pad_id)
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def trained_weight(examples: list[Example]) -> float:
    """Loss normaliser contribution: trained tokens (or their weights) that are actual targets."""
    total = 0.0
    for ex in examples:
        if ex.weights is None:
            total += sum(1 for x in ex.labels[1:] if x != IGNORE)
        else:
            total += sum(w for w, x in zip(ex.weights[1:], ex.labels[1:]) if x != IGNORE)
    return total


def validation_batches(examples: list[Example], cfg: RunConfig) -> list[list[int]]:
    """The validation set in length-grouped micro-batches, in a fixed order (no shuffle)."""
    t = cfg.train
    return length_grouped_batches(lengths_of(examples), batch_tokens=t.batch_tokens,
                                  batch_size=t.batch_size, shuffle=False, seed=0)
