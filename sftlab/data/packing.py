"""Group tokenized examples into micro-batches: best-fit packing into rows, or length-grouped padded batches.

Both paths produce index lists first (`pack_best_fit`, `length_grouped_batches`: pure, deterministic, cheap)
and tensors second (`collate_packed`, `collate_padded`), so the batching plan of a whole epoch is known before
any tensor is built and the loop can compute the global loss normaliser up front.

Packed rows keep their examples independent without a hand-built mask. Since transformers' mask rewrite
(`masking_utils.create_causal_mask`, transformers >= 4.56), a causal LM called with
`attention_mask=None`, `past_key_values=None` and `position_ids` that restart at 0 finds the segments
(`find_packed_sequence_indices`) and builds a block-diagonal causal mask for eager, sdpa and flex attention;
flash-attention derives `cu_seqlens` from the same position_ids (`_is_packed_sequence`, batch size 1).
Caveat found while testing: with `use_cache` left to the config default (True) the model creates an empty
DynamicCache, `past_key_values` is no longer None, and the segments silently attend to each other; callers
must pass `use_cache=False` (`sftlab.train.loss.model_hidden_states` does). tests/test_packing.py checks
packed logits against each example run alone.

Labels follow the HF convention (the loss shifts: position t predicts labels[t+1]). In a packed row the
first token of every segment gets label -100 so segment k's last position never predicts segment k+1's
first token; in the unpacked example that token is never a target either, so the trained set is unchanged.
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from typing import Sequence

import torch

from .tokenize import IGNORE, Example


def pack_best_fit(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Best-fit-decreasing packing of example indices into rows of at most `max_tokens` tokens.

    Longest first; each example goes into the open row with the least room that still fits it (a new row if
    none). Open rows are kept in buckets by remaining room, with a sorted list of the distinct room values,
    so each placement is one bisect. Rows come out in creation order, examples in placement order.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(f"example {i} has {n} tokens, more than max_tokens={max_tokens}; "
                             f"raise the row length or lower data.max_length")
        if n < 1:
            raise ValueError(f"example {i} is empty (0 tokens)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # remaining room -> open rows with exactly that room (a stack)
    rooms: list[int] = []  # sorted distinct keys of by_room
    for i in order:
        n = lengths[i]
        k = bisect_left(rooms, n)
        if k < len(rooms):
            room = rooms[k]
            stack = by_room[room]
            r = stack.pop()
            if not stack:
                del by_room[room]
                rooms.pop(k)
            rows[r].append(i)
        else:
            r, room = len(rows), max_tokens
            rows.append([i])
        left = room - n
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                insort(rooms, left)
            by_room[left].append(r)
    return rows


def length_grouped_batches(lengths: Sequence[int], *, batch_tokens: int | None = None, batch_size: int | None = None,
                           shuffle: bool = True, seed: int = 0) -> list[list[int]]:
    """Batches of similar-length example indices, for padded collation.

    Examples are sorted by length (longest first; with `shuffle`, equal lengths are tie-broken by a seeded
    permutation so batches vary between seeds) and cut greedily: either `batch_size` examples per batch, or as
    many as keep the padded size `len(batch) * max_len <= batch_tokens`. With `shuffle` the batch order is
    then shuffled with `seed`, except that the batch with the most padded tokens stays first (`largest_first`);
    without it, batches stay longest first.
    """
    if (batch_tokens is None) == (batch_size is None):
        raise ValueError("give exactly one of batch_tokens and batch_size")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if batch_tokens is not None and batch_tokens < 1:
        raise ValueError(f"batch_tokens must be at least 1, got {batch_tokens}")
    rng = random.Random(seed)
    tie = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(tie)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], tie[i]))
    batches: list[list[int]] = []
    if batch_size is not None:
        batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    else:
        cur: list[int] = []
        for i in order:
            if lengths[i] > batch_tokens:
                raise ValueError(f"example {i} has {lengths[i]} tokens, more than batch_tokens={batch_tokens}")
            # sorted longest first, so the batch's padded length is its first example's length
            if cur and (len(cur) + 1) * lengths[cur[0]] > batch_tokens:
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
    if shuffle:
        rng.shuffle(batches)
        batches = largest_first(batches, [max(lengths[i] for i in b) * len(b) for b in batches])
    return batches


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


def largest_first(batches: list[list[int]], sizes: Sequence[int]) -> list[list[int]]:
    """The batch of the largest size moved to the front, the others in their order.

    As transformers' length-grouped sampler does: the step with the most memory comes first, so an out-of-memory
    error shows at step 1 instead of hours in, and on CPU the process's heap reaches its peak size once, at the
    start (with `train.malloc_tuning` it is then reused; a later, larger step would page-fault its new memory in;
    measured in docs/benchmarks.md, "CPU kernels and memory").
    """
    if not batches:
        return batches
    k = max(range(len(batches)), key=lambda i: (sizes[i], -i))
    return [batches[k]] + batches[:k] + batches[k + 1:]


def _weights(ex: Example) -> list[float]:
    """Per-token loss weights: the example's own, else 1.0 where trained; always 0 where the label is -100."""
    if ex.weights is None:
        return [0.0 if y == IGNORE else 1.0 for y in ex.labels]
    return [0.0 if y == IGNORE else float(w) for w, y in zip(ex.weights, ex.labels)]


def collate_packed(examples: Sequence[Example]) -> dict:
    """One packed row: `input_ids`, `labels`, `position_ids` (restarting at 0 per segment), `weights` (all
    [1, T]), `cu_seqlens` (int32 [n+1]) and `seq_lens` (list). No `attention_mask`: see the module docstring."""
    if not examples:
        raise ValueError("collate_packed needs at least one example")
    ids, labels, pos, weights, seq_lens = [], [], [], [], []
    for ex in examples:
        n = len(ex.input_ids)
        if n == 0 or len(ex.labels) != n or (ex.weights is not None and len(ex.weights) != n):
            raise ValueError(f"malformed example: {n} input_ids, {len(ex.labels)} labels"
                             + (f", {len(ex.weights)} weights" if ex.weights is not None else ""))
        w = _weights(ex)
        ids += ex.input_ids
        labels += [IGNORE] + list(ex.labels[1:])  # never a target: the previous position is another example
        weights += [0.0] + w[1:]
        pos += range(n)
        seq_lens.append(n)
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seq_lens, dtype=torch.int32), 0)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "weights": torch.tensor([weights], dtype=torch.float32),
        "cu_seqlens": cu,
        "seq_lens": seq_lens,
    }


def collate_padded(examples: Sequence[Example], pad_token_id: int) -> dict:
    """Right-padded [B, L] `input_ids`, `attention_mask`, `labels` (-100 on pad), `position_ids`, `weights`."""
    if not examples:
        raise ValueError("collate_padded needs at least one example")
    width = max(len(ex.input_ids) for ex in examples)
    b = len(examples)
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), IGNORE, dtype=torch.long)
    weights = torch.zeros((b, width), dtype=torch.float32)
    for r, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[r, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[r, :n] = 1
        labels[r, :n] = torch.tensor(ex.labels, dtype=torch.long)
        weights[r, :n] = torch.tensor(_weights(ex), dtype=torch.float32)
    position_ids = torch.arange(width, dtype=torch.long).unsqueeze(0).expand(b, -1).contiguous()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "position_ids": position_ids, "weights": weights}
