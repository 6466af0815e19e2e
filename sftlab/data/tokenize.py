"""Tokenize rendered conversations and build labels (HF convention: labels[i] = input_ids[i] where trained,
-100 elsewhere; the model shifts).

Token ids are the rendered text tokenized as a whole without added special tokens, exactly what
`tokenizer(text, add_special_tokens=False)` gives. Only when a message's text contains the literal
string of an added token (e.g. `<|im_end|>` typed by a user) is the text tokenized piecewise, with the
data pieces tokenized as plain text, so that data never becomes a control token.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass, replace
from operator import itemgetter

from ..config import DataConfig
from .formats import Conversation
from .template import REASONING_CLOSE, REASONING_OPEN, Rendered
from .validate import DataError, Location

IGNORE = -100
_END = itemgetter(1)  # of a (start, end) character offset


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    weights: list[float] | None = None  # per-token loss weights, only with prompt_loss_weight > 0
    task: str | None = None
    truncated: bool = False

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


class Dropped(Exception):
    """An example removed by the truncation policy (not invalid input): reason is `too_long`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _stock_backend(tokenizer):
    """The Rust tokenizer behind a transformers fast tokenizer whose encoding is the stock one, else None."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # transformers 4.x: always go through tokenizer(...)
        return None
    if not isinstance(tokenizer, TokenizersBackend) or type(tokenizer)._encode_plus is not TokenizersBackend._encode_plus:
        return None
    backend = tokenizer.backend_tokenizer
    # tokenizer(...) would switch off a truncation or padding set on the backend; leave such a tokenizer to it.
    return backend if backend.truncation is None and backend.padding is None else None


@dataclass
class _Piece:
    ids: list[int]
    offsets: list[tuple] | None


def _encode(tokenizer, texts: list[str], split_special: bool = False, offsets: bool = False) -> list:
    """Each text tokenized as `tokenizer(texts, add_special_tokens=False, split_special_tokens=split_special)` does:
    objects with `.ids`, and with `offsets` their `.offsets` (character spans)."""
    backend = _stock_backend(tokenizer)
    if backend is not None:
        # What tokenizer(...) runs for these arguments, without building a BatchEncoding and its offset lists
        # (a third of the tokenizing time on T0); without offsets, the call that does not track them either.
        if backend.encode_special_tokens != split_special:
            backend.encode_special_tokens = split_special
        fast = None if offsets else getattr(backend, "encode_batch_fast", None)
        return (fast or backend.encode_batch)(texts, add_special_tokens=False)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets,
                    split_special_tokens=split_special, return_attention_mask=False)
    return [_Piece(ids, offs) for ids, offs in zip(enc["input_ids"], enc.get("offset_mapping") or [None] * len(texts))]


def _pieces(rendered: Rendered, data_cuts: bool, end: int | None = None, span_cuts: bool = True
            ) -> list[tuple[int, int, bool]]:
    """`(start, end, is_data)` pieces partitioning rendered.text[:end]: cut at every trained span's start and end
    (span_cuts), and around message content (data_cuts: a message that spells a control token stays plain text)."""
    end = len(rendered.text) if end is None else end
    data = [(r.content_start, r.content_end) for r in rendered.regions
            if data_cuts and r.content_start is not None and r.content_end > r.content_start]
    bounds = {0, end}
    if span_cuts:
        bounds |= {x for r in rendered.trained_regions() for x in (r.train_start, r.end)}
    bounds |= {x for ab in data for x in ab}
    cuts = sorted(x for x in bounds if 0 <= x <= end)
    return [(a, b, any(s <= a and b <= e for s, e in data)) for a, b in zip(cuts, cuts[1:]) if b > a]


@dataclass
class Encoded:
    """A text tokenized piece by piece: the concatenated ids, and for every piece boundary (character position)
    the index of the first token at or after it (pieces are tokenized alone, so no token straddles one)."""
    text: str
    pieces: list[tuple[int, int, bool]]
    ids: list[int]
    at: dict[int, int]
    tokenizer: object

    def token_at(self, char: int) -> int:
        """Index of the token holding character `char` (the next token if none does): the one piece holding it is
        tokenized again with character offsets (only truncation asks, once per truncated example)."""
        a, b, is_data = next(p for p in self.pieces if p[0] <= char < p[1])
        offsets = _encode(self.tokenizer, [self.text[a:b]], split_special=is_data, offsets=True)[0].offsets
        return self.at[a] + bisect_right(offsets, char - a, key=_END)  # first token ending after


def _encode_pieces(tokenizer, items: list[tuple[str, list[tuple[int, int, bool]]]]) -> list[Encoded]:
    """Each (text, pieces) tokenized piece by piece (data pieces with control tokens split into plain text) and
    concatenated; one batched call per kind of piece, each distinct piece text tokenized once (the template's own
    pieces repeat in every example, short answers in many)."""
    flat = [(n, a, b, is_data) for n, (_, pieces) in enumerate(items) for a, b, is_data in pieces]
    encoded: dict[int, object] = {}
    for kind in (False, True):
        idx = [i for i, f in enumerate(flat) if f[3] == kind]
        if idx:
            texts = [items[flat[i][0]][0][flat[i][1]:flat[i][2]] for i in idx]
            distinct = list(dict.fromkeys(texts))
            once = dict(zip(distinct, _encode(tokenizer, distinct, split_special=kind)))
            encoded.update((i, once[t]) for i, t in zip(idx, texts))
    out = [Encoded(text, pieces, [], {0: 0}, tokenizer) for text, pieces in items]
    for i, (n, a, b, _) in enumerate(flat):
        e = out[n]
        e.at[a] = len(e.ids)
        e.ids.extend(encoded[i].ids)
        e.at[b] = len(e.ids)
    return out


def encode_piecewise(tokenizer, rendered: Rendered) -> list[int]:
    """Template text with control tokens as usual, message content as plain text (no cuts at trained spans:
    the tokens an inference prompt gets)."""
    return _encode_pieces(tokenizer, [(rendered.text, _pieces(rendered, True, span_cuts=False))])[0].ids


def trained_spans(rendered: Rendered, loss_on: str) -> list[tuple[int, int]]:
    """Character spans whose tokens are trained (`render_conversation` marked the trained turns)."""
    if loss_on == "all":
        return [(0, len(rendered.text))]
    return [(r.train_start, r.end) for r in rendered.trained_regions()]


def _last_prompt_char(rendered: Rendered) -> int:
    """The last character of the message before the last trained turn (the end of its instruction); that turn's
    start if there is no such text. Left truncation may cut up to the token holding it."""
    last = (rendered.trained_regions() or rendered.assistant_regions() or rendered.regions)[-1]
    for r in rendered.regions[:rendered.regions.index(last)][::-1]:
        if r.content_start is not None and r.content_end > r.content_start:
            return r.content_end - 1
    return last.start


def build_example(enc: Encoded, rendered: Rendered, opts: DataConfig, where: Location,
                  task: str | None = None) -> Example:
    ids = enc.ids
    n = len(ids)
    labels = [IGNORE] * n
    # trained spans start and end at piece boundaries (tokenize_rendered cuts there)
    token_spans = [(enc.at[a], enc.at[b]) for a, b in trained_spans(rendered, opts.loss_on)]
    for i, j in token_spans:
        labels[i:j] = ids[i:j]
    if not any(j > i for i, j in token_spans):  # token ids are never IGNORE
        raise DataError(where, "no_trained_tokens", f"loss_on={opts.loss_on}")
    weights = None
    if opts.prompt_loss_weight > 0 and opts.loss_on != "all":
        weights = [1.0 if lab != IGNORE else opts.prompt_loss_weight for lab in labels]
        labels = list(ids)
    truncated = False
    if opts.max_length is not None and n > opts.max_length:
        if opts.truncation == "drop":
            raise Dropped("too_long")
        # Keep the end: the whole last response, its header and at least the end of the instruction before it.
        cut = n - opts.max_length
        if cut > enc.token_at(_last_prompt_char(rendered)):
            raise Dropped("response_too_long")
        if opts.loss_on != "all":
            # An earlier response cut in the middle would be trained without its start: it becomes prompt.
            for i, j in token_spans:
                if i < cut < j:
                    if weights is None:
                        labels[cut:j] = [IGNORE] * (j - cut)
                    else:
                        weights[cut:j] = [opts.prompt_loss_weight] * (j - cut)
            if not any(labels[k] != IGNORE and (weights is None or weights[k] == 1.0) for k in range(cut, n)):
                raise Dropped("response_too_long")  # the only trained response was the one cut
        ids, labels = ids[cut:], labels[cut:]
        weights = weights[cut:] if weights is not None else None
        truncated = True
    return Example(list(ids), labels, weights, task, truncated)


def protected_pattern(tokenizer) -> re.Pattern:
    """Matches any string the tokenizer turns into an added (control) token."""
    strings = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, strings)) or "(?!)")


REASONING_TAGS = (REASONING_OPEN, REASONING_CLOSE)  # markup of an assistant's reasoning, not text typed into data


def _control_text(message, protected: re.Pattern) -> bool:
    """Whether a message's content spells a control token (reasoning tags in an assistant's content are markup)."""
    found = protected.findall(message.content)
    return bool(found) and not (message.role == "assistant" and set(found) <= set(REASONING_TAGS))


@dataclass
class Resplit:
    """An example whose later turns `turns` (message indices) are untrained in it because their context tokenizes
    differently inside the example than as their own inference prompt: each needs an example of its own."""
    example: Example
    turns: list[int]


def _misaligned_turns(tokenizer, items: list[tuple[Rendered, Encoded, bool]]) -> list[list[int]]:
    """Per (rendered, encoded, data_cuts): the trained turns after the first whose preceding tokens in the
    example are not the tokens of their own inference prompt (the prompt tokenized alone, as at inference)."""
    checks = []
    for n, (r, _, _) in enumerate(items):
        for g in r.trained_regions()[1:]:
            if g.message >= 0:  # not a {% generation %} block: those are trained where the template puts them
                checks.append((n, g))
    expected = _encode_pieces(tokenizer, [(items[n][0].text, _pieces(items[n][0], items[n][2], g.train_start,
                                                                      span_cuts=False)) for n, g in checks])
    bad: list[list[int]] = [[] for _ in items]
    for (n, g), want in zip(checks, expected):
        enc = items[n][1]
        if enc.ids[:enc.at[g.train_start]] != want.ids:
            bad[n].append(g.message)
    return bad


def tokenize_rendered(batch: list[Rendered], convs: list[Conversation], tokenizer, opts: DataConfig,
                      protected: re.Pattern) -> list[Example | Resplit | DataError | Dropped]:
    """Tokenize a batch of rendered conversations: each piece between trained-span boundaries alone (so every
    trained span starts exactly after its inference prompt's tokens), message content that spells a control token
    as plain text; batched calls."""
    results: list = [None] * len(batch)
    todo = []
    for k, (r, conv) in enumerate(zip(batch, convs)):
        hits = [g for g in r.regions if g.message >= 0 and _control_text(conv.messages[g.message], protected)]
        if any(g.content_start is None for g in hits):
            results[k] = DataError(conv.where, "template", "a message containing control-token text is rewritten "
                                   "by the template, so it cannot be kept as plain text")
            continue
        todo.append((k, bool(hits)))
    encoded = _encode_pieces(tokenizer, [(batch[k].text, _pieces(batch[k], cut)) for k, cut in todo])
    bad = _misaligned_turns(tokenizer, [(batch[k], enc, cut) for (k, cut), enc in zip(todo, encoded)])
    for (k, _), enc, turns in zip(todo, encoded, bad):
        r = batch[k]
        if turns:
            r = Rendered(r.text, [replace(g, trained=False) if g.message in turns else g for g in r.regions])
        try:
            ex = build_example(enc, r, opts, convs[k].where, convs[k].task)
            results[k] = Resplit(ex, turns) if turns else ex
        except (DataError, Dropped) as e:
            results[k] = e
    return results
