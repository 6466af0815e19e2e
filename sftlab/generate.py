"""Generation with the training template: render -> tokenize (as training does) -> left-padded batches ->
`model.generate` stopping at the template's end-of-turn marker -> text without the marker.

The prompt is exactly the prefix training saw before an assistant response (`generation_prompt` of the
same template, tokenized without added special tokens, message text never turned into control tokens),
so what a model learned to answer is what it is asked at inference.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .data.formats import Conversation
from .data.template import (ChatTemplate, end_of_turn_ids, end_of_turn_text, generation_prompt, render_prompt,
                            resolve_template)
from .data.tokenize import encode_piecewise, protected_pattern

Prompt = str | list[dict] | Conversation  # a user message, a message list, or a conversation


def as_messages(prompt: Prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Conversation):
        return prompt.as_dicts()
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def split_reference(conv: Conversation) -> tuple[Conversation, str | None]:
    """Drop a final assistant turn to form the prompt; its content is the reference answer."""
    if conv.messages and conv.messages[-1].role == "assistant":
        return Conversation(conv.messages[:-1], conv.task, conv.where), conv.messages[-1].content
    return conv, None


def encode_prompt(messages: list[dict], tmpl: ChatTemplate, tokenizer, protected=None) -> list[int]:
    """Token ids of the generation prompt, as training tokenizes the same prefix."""
    text = generation_prompt(messages, tmpl)
    protected = protected or protected_pattern(tokenizer)
    if not any(protected.search(m["content"]) for m in messages):
        return tokenizer(text, add_special_tokens=False).input_ids
    # Message text that spells a control token stays plain text, exactly as in sftlab.data.tokenize.
    return encode_piecewise(tokenizer, render_prompt(messages, tmpl))


@dataclass
class Decoding:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def generation_config(decoding: Decoding, tmpl: ChatTemplate, tokenizer):
    """A fresh GenerationConfig (the model's saved sampling defaults do not leak into greedy decoding)."""
    from transformers import GenerationConfig

    eot = end_of_turn_ids(tmpl, tokenizer)
    kwargs = dict(max_new_tokens=decoding.max_new_tokens, do_sample=decoding.do_sample,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot[0])
    if len(eot) == 1:
        kwargs["eos_token_id"] = sorted({eot[0]} | ({tokenizer.eos_token_id} - {None}))
    else:  # a multi-token marker: stop on its text (eos_token_id would stop at any one of its tokens)
        kwargs["stop_strings"] = [end_of_turn_text(tmpl).strip() or end_of_turn_text(tmpl)]
        if tokenizer.eos_token_id is not None:
            kwargs["eos_token_id"] = tokenizer.eos_token_id
    if decoding.do_sample:
        kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=0)
    return GenerationConfig(**kwargs)


def stop_markers(tmpl: ChatTemplate, tokenizer) -> tuple[set[int], str]:
    """(token ids that end a reply, end-of-turn text to cut at) for `decode_reply`."""
    eot = end_of_turn_ids(tmpl, tokenizer)
    ids = (set(eot) if len(eot) == 1 else set()) | ({tokenizer.eos_token_id} - {None})
    return ids, end_of_turn_text(tmpl).strip()


def decode_reply(new_ids: list[int], tokenizer, stops: tuple[set[int], str]) -> str:
    """Generated ids -> reply text: cut at the first end-of-turn (or EOS / padding), marker removed."""
    return split_reply(new_ids, tokenizer, stops)[0]


def split_reply(new_ids: list[int], tokenizer, stops: tuple[set[int], str]) -> tuple[str, bool]:
    """`decode_reply`'s text, and whether the ids end their reply (an end-of-turn / EOS id, or the end-of-turn
    text) rather than stopping at the token budget."""
    stop_ids, marker = stops
    ended = False
    for i, t in enumerate(new_ids):
        if t in stop_ids:
            new_ids, ended = new_ids[:i], True
            break
    text = tokenizer.decode(new_ids, skip_special_tokens=False)
    if marker and marker in text:
        text, ended = text[: text.index(marker)], True
    return text.strip(), ended


def decode_stops(tmpl: ChatTemplate, tokenizer):
    """The decode loop's stop rule: the end-of-turn id (or its text, for a multi-token marker) and EOS."""
    from .decode import Stops

    eot = end_of_turn_ids(tmpl, tokenizer)
    ids = (set(eot) if len(eot) == 1 else set()) | ({tokenizer.eos_token_id} - {None})
    text = "" if len(eot) == 1 else (end_of_turn_text(tmpl).strip() or end_of_turn_text(tmpl))
    return Stops(frozenset(ids), text, tokenizer)


def generate_ids(model, tokenizer, tmpl: ChatTemplate, encoded: list[list[int]], budgets: list[int],
                 decoding: Decoding, batch_size: int = 8, seed: int | None = None,
                 on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """New token ids for each encoded prompt (input order), prompt i cut to `budgets[i]` new tokens.

    The project's decode loop (`sftlab.decode`: finished rows leave, waiting prompts join, a growing KV cache)
    where the model's cache allows it; otherwise transformers' `generate` on length-sorted, left-padded batches
    grouped by budget. Both stop at the template's end-of-turn; `on_batch(n)` is called as n prompts finish."""
    import torch

    from .decode import Sampling, decode, fast_path_problem

    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        if fast_path_problem(model) is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_ids(tmpl, tokenizer)[0]
            sampling = Sampling(decoding.do_sample, decoding.temperature, decoding.top_p)
            return decode(model, encoded, budgets, decode_stops(tmpl, tokenizer), pad, batch_size, sampling, on_batch)
        return _generate_hf(model, tokenizer, tmpl, encoded, budgets, decoding, batch_size, on_batch)
    finally:
        model.train(was_training)


def _generate_hf(model, tokenizer, tmpl, encoded, budgets, decoding, batch_size, on_batch) -> list[list[int]]:
    """transformers' `generate`, for models whose cache the decode loop does not handle."""
    import torch

    from .decode import left_pad

    out: list[list[int]] = [[] for _ in encoded]
    device = next(model.parameters()).device
    # grouped by budget, then by length (similar lengths share a batch)
    order = sorted(range(len(encoded)), key=lambda i: (budgets[i], -len(encoded[i]), i))
    step = max(1, batch_size)
    for start in range(0, len(order), step):
        idx = order[start:start + step]
        cap = max(budgets[i] for i in idx)
        gen_cfg = generation_config(Decoding(cap, decoding.do_sample, decoding.temperature, decoding.top_p),
                                    tmpl, tokenizer)
        input_ids, attention = left_pad([encoded[i] for i in idx], gen_cfg.pad_token_id)
        with torch.no_grad():
            ids = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 generation_config=gen_cfg, tokenizer=tokenizer if gen_cfg.stop_strings else None)
        for row, i in enumerate(idx):
            out[i] = ids[row, input_ids.shape[1]:input_ids.shape[1] + budgets[i]].tolist()
        if on_batch:
            on_batch(len(idx))
    return out


def generate(model, tokenizer, prompts: Iterable[Prompt], template: str | ChatTemplate = "default",
             max_new_tokens: int | list[int] = 128, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, batch_size: int = 8, seed: int | None = None,
             on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Replies to `prompts` (in input order); `max_new_tokens` is one budget or one per prompt.

    `on_batch(n)` is called as n prompts finish (for progress bars)."""
    tmpl = template if isinstance(template, ChatTemplate) else resolve_template(template, tokenizer)
    protected = protected_pattern(tokenizer)
    encoded = [encode_prompt(as_messages(p), tmpl, tokenizer, protected) for p in prompts]
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(encoded)
    if len(budgets) != len(encoded):
        raise ValueError(f"{len(encoded)} prompts but {len(budgets)} token budgets")
    decoding = Decoding(min(budgets, default=1), do_sample, temperature, top_p)  # checks the options
    stops = stop_markers(tmpl, tokenizer)
    new = generate_ids(model, tokenizer, tmpl, encoded, budgets, decoding, batch_size, seed, on_batch)
    return [decode_reply(ids, tokenizer, stops) for ids in new]


def stream_reply(model, tokenizer, messages: list[dict], tmpl: ChatTemplate, on_text: Callable[[str], None],
                 max_new_tokens: int = 512, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0) -> str:
    """Generate one reply, passing text pieces to `on_text` as they are produced; returns the whole reply."""
    import threading

    import torch
    from transformers import TextIteratorStreamer

    gen_cfg = generation_config(Decoding(max_new_tokens, do_sample, temperature, top_p), tmpl, tokenizer)
    ids = encode_prompt(messages, tmpl, tokenizer)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    # Special tokens stay in the stream so the text matches `decode_reply`; the stop texts are cut below.
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=False)
    result: dict = {}

    def run():
        try:
            with torch.no_grad():
                result["out"] = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                               generation_config=gen_cfg, streamer=streamer,
                                               tokenizer=tokenizer if gen_cfg.stop_strings else None)
        except BaseException as e:  # surfaced in the caller's thread
            result["error"] = e
            streamer.end()

    model.eval()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    stop_texts = [t for t in (end_of_turn_text(tmpl).strip(), tokenizer.eos_token) if t]
    text, shown, stopped = "", 0, False
    for piece in streamer:
        if stopped:
            continue  # drain the queue so the generating thread can finish
        text += piece
        cut = min((text.find(t) for t in stop_texts if t in text), default=-1)
        if cut >= 0:
            text, stopped = text[:cut], True
        if not shown:
            text = text.lstrip()  # decode_reply strips leading whitespace too
        if len(text) > shown:
            on_text(text[shown:])
            shown = len(text)
    thread.join()
    if "error" in result:
        raise result["error"]
    return decode_reply(result["out"][0, input_ids.shape[1]:].tolist(), tokenizer, stop_markers(tmpl, tokenizer))


# ---- files ---------------------------------------------------------------------------------------------------
@dataclass
class GenerateSummary:
    examples: int
    with_reference: int  # examples whose dropped last assistant turn is the reference
    seconds: float


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def generate_file(inputs: list[str | Path], model_spec: str, out: Path, data_opts=None, console=None,
                  max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                  batch_size: int = 8, seed: int = 0, dtype: str = "fp32") -> GenerateSummary:
    """Generate for every conversation in `inputs` and write one JSON line per example, atomically.

    Each line: {"index", "task", "prompt" (messages), "reference" (the dropped last assistant turn, or
    null), "generation"}. Records go through the data chain first (`encode_conversations` + `keep_examples`),
    so a record training would reject is named (or, with `skip_invalid`, counted) here too.
    """
    from rich.console import Console

    from .config import DataConfig
    from .data.pipeline import DataReport, encode_conversations, iter_conversations, keep_examples, total_records
    from .io import atomic_write, progress
    from .models import load_model, load_tokenizer

    console = console or Console(stderr=True)
    data_opts = data_opts or DataConfig()
    tokenizer = load_tokenizer(model_spec)
    tmpl = resolve_template(data_opts.template, tokenizer)
    end_of_turn_text(tmpl)  # fail on a template that cannot render a reply before loading the model
    model = load_model(model_spec, dtype=dtype)
    report = DataReport()
    protected = protected_pattern(tokenizer)
    n, n_ref = 0, 0
    t0 = time.perf_counter()
    with progress("generate", console, unit="examples") as bars, atomic_write(out) as f:
        bar = bars.add_task("generate", total=total_records(inputs))
        convs = iter_conversations(inputs, data_opts, report, protected.findall)
        no_length_limit = data_opts.model_copy(update={"max_length": None})  # a prompt is never truncated or dropped
        encoded = encode_conversations(convs, tokenizer, tmpl, no_length_limit, protected)
        valid = (conv for conv, _ in keep_examples(encoded, data_opts.skip_invalid, report))
        # Chunks keep memory bounded while still letting each chunk be sorted by length.
        for chunk in _chunks(valid, max(1, batch_size) * 16):
            pairs = [split_reference(conv) for conv in chunk]
            replies = generate(model, tokenizer, [p for p, _ in pairs], tmpl, max_new_tokens, do_sample,
                               temperature, top_p, batch_size, seed=None if n else seed,
                               on_batch=lambda k: bars.advance(bar, k))
            for (prompt, ref), reply in zip(pairs, replies):
                row = {"index": n, "task": prompt.task, "prompt": prompt.as_dicts(), "reference": ref,
                       "generation": reply}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
                n_ref += ref is not None
        bars.update(bar, total=n, completed=n)
    dt = time.perf_counter() - t0
    parts = [f"{n:,} examples", f"{n / max(dt, 1e-9):.2f} examples/s"]
    if report.invalid.total:
        parts.append(f"{report.invalid.total:,} invalid skipped")
    console.print(f"[green]done[/] {'; '.join(parts)} -> {out}", highlight=False)
    return GenerateSummary(n, n_ref, dt)
