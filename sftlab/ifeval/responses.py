"""IFEval responses: generate them with a model (greedy, its chat template), write and read them in the
upstream format (`{"prompt", "response"}` per line), so responses from any system are scored the same way."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..generate import generate
from ..io import atomic_write, progress, read_jsonl
from .score import IFEvalPrompt, compare, figures, load_prompts, match_responses, score, score_rows


def generate_responses(model, tokenizer, template, prompts: list[IFEvalPrompt], max_new_tokens: int = 1024,
                       batch_size: int = 32, on_batch: Callable[[int], None] | None = None,
                       console=None) -> list[str]:
    """Greedy replies to the prompts (in their order), each prompt a single user turn in `template`.

    Long answers dominate the time (a batch runs until its longest reply ends), so progress goes by prompt:
    `on_batch(n)` after each batch of n, or, without it, a bar with an ETA on `console`."""
    texts = [p.prompt for p in prompts]
    if on_batch is not None:
        return generate(model, tokenizer, texts, template, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        on_batch=on_batch)
    with progress("ifeval", console, unit="prompts") as p:
        bar = p.add_task("ifeval", total=len(texts))
        return generate(model, tokenizer, texts, template, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        on_batch=lambda n: p.advance(bar, n))


def write_responses(path: Path, prompts: list[IFEvalPrompt], responses: list[str]) -> None:
    """The upstream responses file: one `{"prompt", "response"}` line per prompt, written atomically."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    with atomic_write(Path(path)) as f:
        for p, r in zip(prompts, responses):
            f.write(json.dumps({"prompt": p.prompt, "response": r}, ensure_ascii=False) + "\n")


def read_responses(path: Path) -> list[dict]:
    """The rows of an upstream responses file (other fields, e.g. a model name, are kept and ignored)."""
    rows = read_jsonl(Path(path))
    if not rows and not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such responses file")
    return rows


def score_file(responses: Path, inputs: Path, partial: bool = False) -> dict:
    """`score` of an upstream responses file against an IFEval input file, responses matched by prompt."""
    prompts, texts = match_responses(load_prompts(inputs), read_responses(responses), partial, where=str(responses))
    return score(prompts, texts)


def evaluate_model(model, tokenizer, template, prompts: list[IFEvalPrompt], max_new_tokens: int, batch_size: int,
                   console=None) -> list[dict]:
    """Per prompt: the model's greedy reply and the strict/loose verdict of each instruction (`sftlab eval`)."""
    responses = generate_responses(model, tokenizer, template, prompts, max_new_tokens, batch_size, console=console)
    return [{**row, "prompt": p.prompt, "response": r}
            for p, r, row in zip(prompts, responses, score_rows(prompts, responses))]


def section(rows: dict[str, list[dict]], n_resamples: int, seed: int) -> dict:
    """metrics.json's `ifeval`: the figures of each model scored (`model`, `base`) and, with a base, the deltas."""
    out: dict = {role: figures(r) for role, r in rows.items()}
    if "base" in rows:
        out["deltas"] = compare(rows["base"], rows["model"], n_resamples, seed)
    return out
