"""Tokenize rendered conversations and build labels (HF convention: labels[i] = input_ids[i] where trained,
-100 elsewhere; the model shifts).

Token ids are the rendered text tokenized as a whole without added special tokens, exactly what
`tokenizer(text, add_special_tokens=False)` gives. Only when a message's text contains the literal
string of an added token (e.g. `<|im_end|>` typed by a user) is the text tokenized piecewise, with the
data pieces tokenized as plain text, so that data never becomes a control token.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from operator import itemgetter

from ..config import DataConfig
from .formats import Conversation
from .template import Rendered
from .validate import DataError, Location

IGNORE = -100
_START, _END = itemgetter(0), itemgetter(1)  # of a (start, end) character offset


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


def _encode_offsets(tokenizer, texts: list[str], split_special: bool = False) -> list[tuple[list[int], list[tuple]]]:
    backend = _stock_backend(tokenizer)
    if backend is not None:
        # Exactly what tokenizer(...) runs for these arguments, without building a BatchEncoding (a fifth of the
        # tokenizing time on T0).
        if backend.encode_special_tokens != split_special:
            backend.encode_special_tokens = split_special
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                    split_special_tokens=split_special, return_attention_mask=False)
    return list(zip(enc["input_ids"], enc["offset_mapping"]))


def encode_piecewise(tokenizer, rendered: Rendered) -> tuple[list[int], list[tuple]]:
    """Template text with control tokens as usual, message content as plain text."""
    cuts = []
    for r in rendered.regions:
        if r.content_start is not None and r.content_end > r.content_start:
            cuts.append((r.content_start, r.content_end))
    pieces, pos = [], 0
    for a, b in sorted(cuts):
        if a > pos:
            pieces.append((pos, rendered.text[pos:a], False))
        pieces.append((a, rendered.text[a:b], True))
        pos = b
    if pos < len(rendered.text):
        pieces.append((pos, rendered.text[pos:], False))
    ids, offs = [], []
    for start, text, is_data in pieces:
        (pid, poff), = _encode_offsets(tokenizer, [text], split_special=is_data)
        ids += pid
        offs += [(s + start, e + start) for s, e in poff]
    return ids, offs


def trained_spans(rendered: Rendered, loss_on: str) -> list[tuple[int, int]]:
    """Character spans whose tokens are trained."""
    if loss_on == "all":
        return [(0, len(rendered.text))]
    spans = [(r.content_start, r.end) for r in rendered.regions if r.role == "assistant" and r.trained]
    if loss_on == "last_assistant":
        last = rendered.assistant_regions()[-1]
        spans = [(last.content_start, last.end)] if last.trained else []
    return spans


def _token_range(offsets: list[tuple], a: int, b: int, where: Location) -> tuple[int, int]:
    """Indices [i, j) of the tokens covering characters [a, b); a token may not straddle a or b."""
    i = bisect_right(offsets, a, key=_END)  # first token ending after a
    j = bisect_left(offsets, b, key=_START)  # first token starting at or after b
    if i < len(offsets) and offsets[i][0] < a:
        raise DataError(where, "boundary_merge",
                        "the response's first characters join the template's header in one token, so the prompt "
                        "at inference would tokenize differently; remove leading whitespace from the response")
    if j > 0 and offsets[j - 1][1] > b:
        raise DataError(where, "boundary_merge", "the end-of-turn marker joins the following text in one token")
    return i, j


def _last_prompt_token(offsets: list[tuple], rendered: Rendered) -> int:
    """Index of the token holding the last character of the message before the last assistant turn (the end
    of its instruction); the assistant header if there is no such text. Left truncation may cut up to it."""
    last = rendered.assistant_regions()[-1]
    anchor = last.start
    for r in rendered.regions[: last.message][::-1]:
        if r.content_start is not None and r.content_end > r.content_start:
            anchor = r.content_end - 1
            break
    return bisect_right(offsets, anchor, key=_END)


def build_example(ids: list[int], offsets: list[tuple], rendered: Rendered, opts: DataConfig,
                  where: Location, task: str | None = None) -> Example:
    n = len(ids)
    labels = [IGNORE] * n
    spans = trained_spans(rendered, opts.loss_on)
    token_spans = [_token_range(offsets, a, b, where) for a, b in spans]
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
        if cut > _last_prompt_token(offsets, rendered):
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


def tokenize_rendered(batch: list[Rendered], convs: list[Conversation], tokenizer, opts: DataConfig,
                      protected: re.Pattern) -> list[Example | DataError | Dropped]:
    """Tokenize a batch of rendered conversations (one fast batched call for the common case)."""
    results: list = [None] * len(batch)
    fast = []
    for k, (r, conv) in enumerate(zip(batch, convs)):
        hits = [i for i, m in enumerate(conv.messages) if protected.search(m.content)]
        if not hits:
            fast.append(k)
            continue
        try:
            if any(r.regions[i].content_start is None for i in hits):
                raise DataError(conv.where, "template", "a message containing control-token text is rewritten by "
                                "the template, so it cannot be kept as plain text")
            ids, offs = encode_piecewise(tokenizer, r)
            results[k] = build_example(ids, offs, r, opts, conv.where, conv.task)
        except (DataError, Dropped) as e:
            results[k] = e
    if fast:
        encoded = _encode_offsets(tokenizer, [batch[k].text for k in fast])
        for k, (ids, offs) in zip(fast, encoded):
            try:
                results[k] = build_example(ids, offs, batch[k], opts, convs[k].where, convs[k].task)
            except (DataError, Dropped) as e:
                results[k] = e
    return results
