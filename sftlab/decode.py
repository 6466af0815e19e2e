"""The decode loop: continuous batching over a growing KV cache, for every greedy or sampled reply sftlab makes.

transformers' `generate` decodes a left-padded batch until its longest reply ends: a row that has finished keeps
decoding padding, and the dynamic cache is re-concatenated (copied whole) at every step. Here

- rows leave the batch as they finish (end-of-turn id, stop text, or their own token budget), and waiting
  prompts (longest first) are prefilled and join it, so the batch stays full while there is work;
- each layer's keys and values live in a buffer that grows by doubling (`GrowingLayer`), so a step writes one
  column instead of copying the cache;
- columns that every row has as left padding are cut off when rows leave.

A row sees exactly what it would see alone: its own tokens at positions 0, 1, ... (padding is masked and takes no
position), so greedy replies are transformers' greedy replies token for token (up to float reassociation of a
different batch shape, as between any two batchings). The fast path needs a cache of plain full-attention layers;
`fast_path_problem` names why a model cannot take it (sliding windows, recurrent state), and the caller then uses
transformers' `generate`.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

MIN_CAPACITY = 64  # columns a layer buffer starts with
PREFILL_TOKENS = 4096  # padded tokens per prefill forward at most (one longer prompt goes alone)


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer whose keys/values are views of a buffer with spare columns and rows: a step
    writes one column (the buffer doubles when full), rows that leave are replaced by moving the last rows into
    their slots, and rows that join are written into free slots."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.length = self.rows = 0
        self.key_buf = self.value_buf = None
        self.is_initialized = True

    def _realloc(self, rows: int, columns: int, like_k: torch.Tensor, like_v: torch.Tensor, at: int = 0) -> None:
        """New buffers of `rows` x `columns` holding the current rows' used columns from column `at` (columns
        before are zeros: padding is masked, but must be finite, as 0 x NaN is NaN; columns past the used ones are
        never read, so not cleared)."""
        k = like_k.new_empty(rows, like_k.shape[1], columns, like_k.shape[3])
        v = like_v.new_empty(rows, like_v.shape[1], columns, like_v.shape[3])
        if self.length:
            for new, old in ((k, self.key_buf), (v, self.value_buf)):
                new[:self.rows, :, :at].zero_()
                new[:self.rows, :, at:at + self.length] = old[:self.rows, :, :self.length]
        self.key_buf, self.value_buf, self.length = k, v, self.length + at if self.length else 0

    def _views(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = self.key_buf[:self.rows, :, :self.length]
        self.values = self.value_buf[:self.rows, :, :self.length]
        return self.keys, self.values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.key_buf is None:
            self.rows = key_states.shape[0]
        n = self.length + key_states.shape[-2]
        if self.key_buf is None or n > self.key_buf.shape[-2]:
            have = 0 if self.key_buf is None else self.key_buf.shape[-2]
            self._realloc(self.rows if self.key_buf is None else self.key_buf.shape[0],
                          max(n, 2 * have, MIN_CAPACITY), key_states, value_states)
        self.key_buf[:self.rows, :, self.length:n] = key_states
        self.value_buf[:self.rows, :, self.length:n] = value_states
        self.length = n
        return self._views()

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length():
            keys, values = self.key_buf[:self.rows][indices], self.value_buf[:self.rows][indices]
            self.rows = len(indices)
            self.key_buf[:self.rows, :, :self.length] = keys[:, :, :self.length]
            self.value_buf[:self.rows, :, :self.length] = values[:, :, :self.length]
            self._views()

    def move_rows(self, dst: list[int], src: list[int], n: int) -> None:
        """Row src[i] moves to slot dst[i], then the first `n` rows are kept (no other row is copied)."""
        if not self.get_seq_length():
            return
        if dst:
            d = torch.tensor(dst, device=self.key_buf.device)
            s = torch.tensor(src, device=self.key_buf.device)
            for buf in (self.key_buf, self.value_buf):
                buf[d, :, :self.length] = buf[s, :, :self.length]
        self.rows = n
        self._views()

    def drop_left(self, columns: int) -> None:
        """Forget the first `columns` columns (padding of every row)."""
        if columns and self.get_seq_length():
            keys, values = self.keys[:, :, columns:], self.values[:, :, columns:]
            self.length -= columns
            for name, used in (("key_buf", keys), ("value_buf", values)):
                buf = getattr(self, name)
                new = buf.new_empty(buf.shape[0], buf.shape[1], max(2 * self.length, MIN_CAPACITY), buf.shape[3])
                new[:self.rows, :, :self.length] = used
                setattr(self, name, new)
            self._views()

    def join(self, other: GrowingLayer, pad_self: int, pad_other: int, row_capacity: int = 0) -> None:
        """Append `other`'s rows to this layer's, each side left-padded (zeros) to the common width. Written into
        free slots when this layer's rows need no padding and there is room; otherwise into new buffers of at
        least `row_capacity` rows."""
        width = self.length + pad_self
        assert width == other.length + pad_other
        rows = self.rows + other.rows
        if pad_self or rows > self.key_buf.shape[0]:
            self._realloc(max(rows, row_capacity), max(2 * width, MIN_CAPACITY), self.key_buf, self.value_buf,
                          at=pad_self)
        for buf, part in ((self.key_buf, other.key_buf), (self.value_buf, other.value_buf)):
            buf[self.rows:rows, :, :pad_other].zero_()
            buf[self.rows:rows, :, pad_other:width] = part[:other.rows, :, :other.length]
        self.rows, self.length = rows, width
        self._views()


def fast_path_problem(model) -> str | None:
    """Why `decode` cannot run this model (None when it can): every cache layer must be plain full attention."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return f"{type(model).__name__} is an encoder-decoder model"
    try:
        layers = DynamicCache(config=config).layers
    except Exception as e:  # a config transformers' cache cannot read
        return f"transformers' DynamicCache does not take {type(config).__name__}: {e}"
    kinds = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if kinds:
        return f"{type(config).__name__} has cache layers of kind {', '.join(kinds)} (sliding window or recurrent state)"
    if _cache_argument(model) is None:
        return f"{type(model).__name__}.forward takes no KV cache argument"
    return None


def _cache_argument(model) -> str | None:
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


@dataclass
class Sampling:
    """How the next token is chosen: greedy (argmax), or sampled at `temperature` within the `top_p` nucleus."""
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits divided by the temperature, the tokens outside the top-p nucleus at -inf (as transformers'
        TemperatureLogitsWarper then TopPLogitsWarper: the tail whose mass is <= 1 - top_p goes, one token stays)."""
        logits = logits.float() / self.temperature
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=False)
            tail = sorted_logits.softmax(-1).cumsum(-1) <= 1 - self.top_p
            tail[:, -1] = False
            logits = logits.masked_fill(tail.scatter(1, order, tail), float("-inf"))
        return logits

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.do_sample:
            return logits.argmax(-1)
        probs = self.warp(logits).softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)


@dataclass
class Stops:
    """When a reply ends: one of `ids`, or `text` appearing in its last tokens (a multi-token end-of-turn)."""
    ids: frozenset[int]
    text: str = ""
    tokenizer: object = None

    def hit(self, new_ids: list[int]) -> bool:
        if new_ids[-1] in self.ids:
            return True
        if not self.text:
            return False
        window = new_ids[-(len(self.text) + 4):]  # a marker of n characters spans at most n tokens (+ byte pieces)
        return self.text in self.tokenizer.decode(window, skip_special_tokens=False)


class _Rows:
    """The rows decoding together: prompt index, 2-D attention mask, next position, pending input, new ids."""

    def __init__(self, index: list[int], mask: torch.Tensor, cache: Cache, last: torch.Tensor):
        self.index, self.mask, self.cache, self.last = index, mask, cache, last
        self.new: list[list[int]] = [[int(t)] for t in last.tolist()]

    def __len__(self) -> int:
        return len(self.index)


def _new_cache(n_layers: int) -> Cache:
    return Cache(layers=[GrowingLayer() for _ in range(n_layers)])


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of `prompts`, left-padded to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Each real token's position among its row's real tokens (padding gets 1, as transformers' generate)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


class _Model:
    """One forward of the model with the cache under the name its `forward` takes."""

    def __init__(self, model):
        self.model, self.cache_arg = model, _cache_argument(model)
        self.n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def last_logits(self, ids, mask, positions, cache) -> torch.Tensor:
        kwargs = {self.cache_arg: cache, "use_cache": True}
        if self.keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        return out.logits[:, -1]


def _prefill(m: _Model, index: list[int], prompts: list[list[int]], pad_id: int, sampling: Sampling,
             device) -> _Rows:
    ids, mask = left_pad([prompts[i] for i in index], pad_id, device)
    cache = _new_cache(m.n_layers)
    logits = m.last_logits(ids, mask, _positions(mask), cache)
    return _Rows(list(index), mask, cache, sampling.choose(logits))


def prefill_groups(lengths: list[int], max_tokens: int = PREFILL_TOKENS) -> list[list[int]]:
    """Positions of `lengths` (longest first) in groups prefilled together: a group takes the next prompt while
    its padded size stays within `max_tokens` (a longer prompt goes alone) and that prompt is at least 3/4 as
    long as the group's first, so left padding wastes at most a quarter of a prefill."""
    groups: list[list[int]] = []
    for i, n in enumerate(lengths):
        g = groups[-1] if groups else None
        if g and (len(g) + 1) * lengths[g[0]] <= max_tokens and 4 * n >= 3 * lengths[g[0]]:
            g.append(i)
        else:
            groups.append([i])
    return groups


def _prefill_into(rows: _Rows | None, m: _Model, index: list[int], prompts: list[list[int]], pad_id: int,
                  sampling: Sampling, device, max_tokens: int, batch_size: int) -> _Rows:
    """`_prefill` of `index` (longest first) in `prefill_groups`, each group joining `rows` (or starting them)."""
    for g in prefill_groups([len(prompts[i]) for i in index], max_tokens):
        joining = _prefill(m, [index[j] for j in g], prompts, pad_id, sampling, device)
        rows = joining if rows is None else _join(rows, joining, batch_size)
    return rows


def _step(m: _Model, rows: _Rows, sampling: Sampling) -> None:
    rows.mask = torch.cat([rows.mask, rows.mask.new_ones(len(rows), 1)], dim=1)
    positions = (rows.mask.sum(-1, keepdim=True) - 1)
    logits = m.last_logits(rows.last[:, None], rows.mask, positions, rows.cache)
    rows.last = sampling.choose(logits)
    for r, t in enumerate(rows.last.tolist()):
        rows.new[r].append(int(t))


def _join(a: _Rows, b: _Rows, row_capacity: int) -> _Rows:
    width = max(a.mask.shape[1], b.mask.shape[1])
    pad_a, pad_b = width - a.mask.shape[1], width - b.mask.shape[1]
    for la, lb in zip(a.cache.layers, b.cache.layers):
        la.join(lb, pad_a, pad_b, row_capacity)
    mask = torch.cat([torch.nn.functional.pad(a.mask, (pad_a, 0)), torch.nn.functional.pad(b.mask, (pad_b, 0))])
    a.index, a.mask, a.last, a.new = a.index + b.index, mask, torch.cat([a.last, b.last]), a.new + b.new
    return a


def fill_holes(keep: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Rows `keep` (sorted) to stay: (order, dst, src) where the last kept rows move into the first leaving
    rows' slots (`dst[i] <- src[i]`), so that the first len(keep) slots hold them in `order`; only moved rows are
    copied."""
    k, staying = len(keep), set(keep)
    holes = [r for r in range(k) if r not in staying]
    movers = [r for r in keep if r >= k]
    order = list(range(k))
    for d, r in zip(holes, movers):
        order[d] = r
    return order, holes, movers


def _keep(rows: _Rows, keep: list[int]) -> None:
    order, dst, src = fill_holes(keep)
    for layer in rows.cache.layers:
        layer.move_rows(dst, src, len(order))
    sel = torch.tensor(order, dtype=torch.long, device=rows.mask.device)
    rows.index = [rows.index[r] for r in order]
    rows.new = [rows.new[r] for r in order]
    rows.mask, rows.last = rows.mask[sel], rows.last[sel]
    # columns that are padding in every remaining row are dropped (worth a copy once they are a quarter)
    pad = int((rows.mask.cumsum(-1) == 0).sum(-1).min())
    if pad and pad * 4 >= rows.mask.shape[1]:
        for layer in rows.cache.layers:
            layer.drop_left(pad)
        rows.mask = rows.mask[:, pad:]


def decode(model, prompts: list[list[int]], budgets: list[int], stops: Stops, pad_id: int, batch_size: int = 8,
           sampling: Sampling | None = None, on_done: Callable[[int], None] | None = None,
           prefill_tokens: int = PREFILL_TOKENS) -> list[list[int]]:
    """New token ids for each prompt (in input order), ending with the stop id or text when one was hit.

    Prompt i gets at most `budgets[i]` new tokens. At most `batch_size` rows decode together; waiting prompts
    (longest first) join when a quarter of the slots are free, or when the batch is empty; they are prefilled in
    groups of similar length of at most `prefill_tokens` padded tokens (`prefill_groups`). `on_done(n)` is called
    as n replies finish."""
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(budgets)} budgets")
    if any(b < 1 for b in budgets):
        raise ValueError("every token budget must be at least 1")
    if any(not p for p in prompts):
        raise ValueError("an empty prompt cannot be decoded")
    problem = fast_path_problem(model)
    if problem:
        raise ValueError(f"sftlab's decode loop cannot run this model: {problem}")
    sampling = sampling or Sampling()
    batch_size = max(1, batch_size)
    m = _Model(model)
    device = next(model.parameters()).device
    waiting = deque(sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i)))
    out: list[list[int]] = [[] for _ in prompts]
    rows: _Rows | None = None
    with torch.inference_mode():
        while waiting or rows:
            free = batch_size - (len(rows) if rows else 0)
            if waiting and (rows is None or free * 4 >= batch_size):
                rows = _prefill_into(rows, m, [waiting.popleft() for _ in range(min(free, len(waiting)))], prompts,
                                     pad_id, sampling, device, prefill_tokens, batch_size)
            else:
                _step(m, rows, sampling)
            done = [r for r, (i, new) in enumerate(zip(rows.index, rows.new))
                    if len(new) >= budgets[i] or stops.hit(new)]
            if not done:
                continue
            for r in done:
                out[rows.index[r]] = rows.new[r]
            keep = [r for r in range(len(rows)) if r not in set(done)]
            if keep:
                _keep(rows, keep)
            else:
                rows = None
            if on_done:
                on_done(len(done))
    return out
