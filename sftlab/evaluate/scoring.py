"""Negative log-likelihood of the trained tokens of tokenized examples, in batched forward passes.

The tokens scored are exactly those the data layer trains (`Example.labels != -100`, HF convention: the
label at position i is predicted from positions < i). Examples are sorted by length, grouped up to a
token budget, right-padded to the batch maximum with an attention mask, and run under
`torch.inference_mode()`; padding never changes a real token's prediction in a causal model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from ..data.formats import Conversation
from ..data.template import ChatTemplate, TemplateError, render_conversation
from ..data.tokenize import IGNORE, Dropped, Example, TokenizeOptions, protected_pattern, tokenize_rendered
from ..data.validate import DataError


@dataclass(frozen=True)
class Nll:
    """Summed NLL (nats) over an example's scored tokens, and their number."""

    total: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.total / self.tokens if self.tokens else float("nan")


def length_batches(lengths: list[int], batch_tokens: int, max_batch: int = 64) -> list[list[int]]:
    """Indices grouped by ascending length so that batch size x longest length stays within `batch_tokens`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, cur = [], []
    for i in order:
        if cur and ((len(cur) + 1) * lengths[i] > batch_tokens or len(cur) >= max_batch):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def _accepts_logits_to_keep(model) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def example_nll(model, examples: list[Example], pad_id: int, batch_tokens: int = 4096,
                on_batch: Callable[[int], None] | None = None) -> list[Nll]:
    """Per example: NLL summed over its trained tokens (labels != -100), in input order."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    slices = _accepts_logits_to_keep(model)
    out: list[Nll | None] = [None] * len(examples)
    was_training = model.training
    model.eval()
    try:
        for batch in length_batches([len(ex.input_ids) for ex in examples], batch_tokens):
            width = max(len(examples[i].input_ids) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                n = len(examples[i].input_ids)
                ids[row, :n] = torch.tensor(examples[i].input_ids)
                labels[row, :n] = torch.tensor(examples[i].labels)
                mask[row, :n] = 1
            target = labels[:, 1:]
            keep = (target != IGNORE).any(dim=0).nonzero().squeeze(1)  # positions whose next token is scored
            target = target[:, keep]
            rows, _ = (target != IGNORE).nonzero(as_tuple=True)
            with torch.inference_mode():
                if slices:  # the output layer runs on the scored positions only
                    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                                   logits_to_keep=keep.to(device)).logits
                else:
                    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, keep.to(device)]
                scored = target != IGNORE
                nll = F.cross_entropy(logits[scored.to(device)].float(), target[scored].to(device), reduction="none")
                sums = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, rows, nll.double().cpu())
                counts = scored.sum(dim=1)
            for row, i in enumerate(batch):
                out[i] = Nll(float(sums[row]), int(counts[row]))
            if on_batch:
                on_batch(len(batch))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def tokenize_conversations(convs: list[Conversation], tokenizer, tmpl: ChatTemplate,
                           opts: TokenizeOptions) -> list[Example | DataError | Dropped]:
    """Conversations built in code (few-shot prompts, QA probes) -> examples, exactly as the data layer
    tokenizes and masks files; a failure is returned in place of its example."""
    protected = protected_pattern(tokenizer)
    out: list = [None] * len(convs)
    rendered, keep = [], []
    for k, conv in enumerate(convs):
        try:
            rendered.append(render_conversation(conv, tmpl))
            keep.append(k)
        except TemplateError as e:
            out[k] = DataError(conv.where, "template", str(e)) if conv.where else e
    for k, res in zip(keep, tokenize_rendered(rendered, [convs[k] for k in keep], tokenizer, opts, protected)):
        out[k] = res
    return out
