"""IFEval prompts in, figures out: load the prompts, score responses, compare two models.

Figures are fractions in [0, 1]:
- `prompt_strict` / `prompt_loose`: share of prompts whose every instruction is followed;
- `instruction_strict` / `instruction_loose`: share of all instructions followed, each counted separately;
- `by_instruction` / `by_family`: instruction-level accuracy per instruction id (`punctuation:no_comma`) and
  per family (`punctuation`), strict and loose.
Strict checks the response as it is; loose accepts it if any of 8 variants passes (`checkers.loose_variants`),
exactly as google-research `instruction_following_eval/evaluation_lib.py` defines them.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..evaluate.metrics import paired_bootstrap_ci
from ..io import read_jsonl
from .checkers import follows

FIGURES = ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose")


@dataclass(frozen=True)
class IFEvalPrompt:
    key: int
    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict, ...]


SHARED_INPUTS = "../shared/data/ifeval/input_data.jsonl"  # this project's shared copy, beside the checkout


def resolve_inputs(path: str | Path) -> Path:
    """The IFEval inputs file: `path` as given; the default `SHARED_INPUTS`, when the working directory has no such
    file, beside the sftlab checkout (so `sftlab eval --ifeval` works from any directory there). A missing file
    is an error."""
    path = Path(path)
    if not path.is_file() and str(path) == SHARED_INPUTS:
        beside = Path(__file__).resolve().parents[2] / SHARED_INPUTS
        path = beside if beside.is_file() else path
    if not path.is_file():
        raise ValueError(f"{path}: no such IFEval inputs file (give its path: --ifeval-inputs / eval.ifeval_inputs)")
    return path


def load_prompts(path: str | Path, limit: int | None = None, seed: int = 0) -> list[IFEvalPrompt]:
    """The prompts of an IFEval input file (`{"key", "prompt", "instruction_id_list", "kwargs"}` per line), in
    file order; with `limit`, a seeded random sample of that many, still in file order."""
    path = resolve_inputs(path)
    prompts = []
    for i, row in enumerate(read_jsonl(path), start=1):
        try:
            ids, kwargs = tuple(row["instruction_id_list"]), tuple(dict(k) for k in row["kwargs"])
            prompts.append(IFEvalPrompt(int(row["key"]), str(row["prompt"]), ids, kwargs))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: record {i}: not an IFEval input ({type(e).__name__}: {e})") from None
        if len(ids) != len(kwargs):
            raise ValueError(f"{path}: record {i}: {len(ids)} instruction ids but {len(kwargs)} kwargs")
    if not prompts:
        raise ValueError(f"{path}: no IFEval prompts")
    if limit is not None and limit < len(prompts):
        if limit < 1:
            raise ValueError(f"the IFEval limit must be at least 1, got {limit}")
        keep = sorted(random.Random(seed).sample(range(len(prompts)), limit))
        prompts = [prompts[i] for i in keep]
    return prompts


def score_rows(prompts: list[IFEvalPrompt], responses: list[str]) -> list[dict]:
    """One row per prompt: key, instruction ids, and the strict and loose verdict of each instruction."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    rows = []
    for p, response in zip(prompts, responses):
        verdicts = [follows(i, kw, p.prompt, response) for i, kw in zip(p.instruction_ids, p.kwargs)]
        rows.append({"key": p.key, "instructions": list(p.instruction_ids),
                     "strict": [s for s, _ in verdicts], "loose": [lo for _, lo in verdicts]})
    return rows


def figures(rows: list[dict]) -> dict:
    """The four accuracies and the per-instruction and per-family ones, from scored rows."""
    out: dict = {"prompts": len(rows), "instructions": sum(len(r["instructions"]) for r in rows)}
    for mode in ("strict", "loose"):
        out[f"prompt_{mode}"] = sum(all(r[mode]) for r in rows) / max(len(rows), 1)
        out[f"instruction_{mode}"] = sum(sum(r[mode]) for r in rows) / max(out["instructions"], 1)
    for name, group in (("by_instruction", lambda i: i), ("by_family", lambda i: i.split(":")[0])):
        counts: dict = defaultdict(lambda: [0, 0, 0])  # n, strict, loose
        for r in rows:
            for inst, s, lo in zip(r["instructions"], r["strict"], r["loose"]):
                c = counts[group(inst)]
                c[0], c[1], c[2] = c[0] + 1, c[1] + s, c[2] + lo
        out[name] = {k: {"n": n, "strict": s / n, "loose": lo / n} for k, (n, s, lo) in sorted(counts.items())}
    return out


def score(prompts: list[IFEvalPrompt], responses: list[str]) -> dict:
    """`figures` of the responses (aligned with `prompts`), plus the per-prompt `rows` they come from."""
    rows = score_rows(prompts, responses)
    return {**figures(rows), "rows": rows}


def summary_lines(figs: dict) -> list[str]:
    """The figures as a short text table: the four accuracies, then instruction-level accuracy per family."""
    lines = [f"IFEval: {figs['prompts']} prompts, {figs['instructions']} instructions",
             f"{'':<20}{'strict':>8}{'loose':>8}",
             f"{'prompt-level':<20}{figs['prompt_strict']:>8.1%}{figs['prompt_loose']:>8.1%}",
             f"{'instruction-level':<20}{figs['instruction_strict']:>8.1%}{figs['instruction_loose']:>8.1%}"]
    lines += [f"  {fam:<18}{v['strict']:>8.1%}{v['loose']:>8.1%}   n={v['n']}" for fam, v in figs["by_family"].items()]
    return lines


def _delta(base: list[float], tuned: list[float], weights: list[float] | None, n_resamples: int, seed: int) -> dict:
    d, lo, hi = paired_bootstrap_ci(base, tuned, weights=weights, n_resamples=n_resamples, seed=seed)
    return {"delta": d, "ci95": [lo, hi], "n": len(base)}


def compare(base_rows: list[dict], tuned_rows: list[dict], n_resamples: int = 1000, seed: int = 0) -> dict:
    """Tuned minus base for the four figures and per instruction id, with paired bootstrap 95 % CIs.

    Prompts are resampled (one resample for both models): prompt-level figures average the per-prompt
    all-followed 0/1; instruction-level ones weight each prompt's followed fraction by its instruction count,
    so instructions of one prompt move together. Per instruction id, its instructions are resampled."""
    if [r["key"] for r in base_rows] != [r["key"] for r in tuned_rows]:
        raise ValueError("base and model were scored on different IFEval prompts; cannot pair them")
    if not base_rows:
        raise ValueError("no IFEval rows to compare")
    out: dict = {}
    sizes = [len(r["instructions"]) for r in base_rows]
    for mode in ("strict", "loose"):
        out[f"prompt_{mode}"] = _delta([float(all(r[mode])) for r in base_rows],
                                       [float(all(r[mode])) for r in tuned_rows], None, n_resamples, seed)
        out[f"instruction_{mode}"] = _delta([sum(r[mode]) / len(r[mode]) for r in base_rows],
                                            [sum(r[mode]) / len(r[mode]) for r in tuned_rows], sizes,
                                            n_resamples, seed)
    by_id: dict = defaultdict(lambda: {"strict": ([], []), "loose": ([], [])})
    for b, t in zip(base_rows, tuned_rows):
        for j, inst in enumerate(b["instructions"]):
            for mode in ("strict", "loose"):
                by_id[inst][mode][0].append(float(b[mode][j]))
                by_id[inst][mode][1].append(float(t[mode][j]))
    out["by_instruction"] = {inst: {mode: _delta(*v[mode], None, n_resamples, seed) for mode in ("strict", "loose")}
                             for inst, v in sorted(by_id.items())}
    return out


def match_responses(prompts: list[IFEvalPrompt], rows: list[dict], partial: bool = False,
                    where: str = "responses") -> tuple[list[IFEvalPrompt], list[str]]:
    """Pair upstream-format response rows (`{"prompt", "response"}`) with the prompts by prompt text.

    A response to a prompt that is not among the inputs is an error (the wrong inputs file); a prompt without a
    response is one too unless `partial` (then only the answered prompts are scored). As upstream, a prompt
    answered twice keeps its last response."""
    by_prompt: dict[str, str] = {}
    for i, row in enumerate(rows, start=1):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
            raise ValueError(f"{where}: record {i}: expected string fields 'prompt' and 'response'")
        by_prompt[row["prompt"]] = row["response"]
    known = {p.prompt for p in prompts}
    unknown = [p for p in by_prompt if p not in known]
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} response(s) answer a prompt that is not in the inputs, "
                         f"e.g. {unknown[0][:80]!r}")
    answered = [p for p in prompts if p.prompt in by_prompt]
    if len(answered) < len(prompts) and not partial:
        raise ValueError(f"{where}: {len(prompts) - len(answered)} of {len(prompts)} prompts have no response "
                         "(score the answered ones only with --partial)")
    if not answered:
        raise ValueError(f"{where}: no response matches a prompt of the inputs")
    return answered, [by_prompt[p.prompt] for p in answered]
