"""Negative log-likelihood of the trained tokens of tokenized examples, in batched forward passes.

The tokens scored are exactly those the data layer trains (`Example.labels != -100`, HF convention: the
label at position i is predicted from positions < i). Examples are sorted by length, grouped up to a
token budget, right-padded to the batch maximum with an attention mask (`data.packing.collate_padded`), and
scored by `sftlab.lm.response_nll` (the definition training and the audit use) without gradients; padding
never changes a real token's prediction in a causal model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..data.packing import collate_padded, length_batches
from ..data.tokenize import Example


@dataclass(frozen=True)
class Nll:
    """Summed NLL (nats) over an example's scored tokens, and their number."""

    total: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.total / self.tokens if self.tokens else float("nan")


def example_nll(model, examples: list[Example], pad_id: int, batch_tokens: int = 4096,
                on_batch: Callable[[int], None] | None = None, attention: str | None = None) -> list[Nll]:
    """Per example: NLL summed over its trained tokens (labels != -100), in input order (`lm.response_nll`).
    attention: the attention implementation of these forwards (`modelcheck.scoring_attention`; None: the model's)."""
    from ..lm import attention_as, response_nll

    out: list[Nll | None] = [None] * len(examples)
    was_training = model.training
    model.eval()
    try:
        with attention_as(model, attention):
            for batch in length_batches([len(ex.input_ids) for ex in examples], batch_tokens):
                res = response_nll(model, collate_padded([examples[i] for i in batch], pad_id))
                for i, total, n in zip(batch, res.sums.tolist(), res.counts.tolist()):
                    out[i] = Nll(total, n)
                if on_batch:
                    on_batch(len(batch))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]
