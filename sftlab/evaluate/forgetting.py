"""Forgetting probes: general-knowledge QA and plain-text perplexity, compared before and after tuning.

QA probe (any JSONL/JSON/CSV/Parquet with a question field and an answer field holding one gold answer
or a list of them, e.g. Natural Questions open):
- `gold_nll`: for each gold answer g, the conversation [user: prompt(question), assistant: g] is rendered
  with the chat template and tokenized by the data layer; the answer's NLL is the mean over its trained
  tokens (the answer tokens plus the end-of-turn marker). A question's value is the minimum over its
  gold answers (the model is credited with the answer it finds likeliest). Lower is better.
- `exact_match`: the greedy short generation, normalised (`metrics.normalise_answer`), equals any
  normalised gold answer.
- `contains`: any normalised gold answer occurs as whole words inside the normalised generation (the
  lenient variant for chatty models; reported beside exact match, never instead of it).
- `choice_accuracy`: a question's options — its record's own (`choices` field: a list holding a gold answer), else
  its first gold answer among `qa_distractors` (3) gold answers of other questions of the same form
  (`matched_distractors`) — are each scored as the reply, like a gold answer; correct when the option with the
  lowest mean NLL per token is a gold one. The options share the question and the answer format, so a model that merely learned to answer in
  another style (shorter, say) moves every option alike: this is the probe's format-independent measure.
  `gold_nll` is not: a tuned model that answers tersely makes any short gold answer likelier without knowing
  more, so it is labelled format-sensitive and never coloured better or worse.
- `few_shot_exact_match` / `few_shot_contains`: exact match / contains of the greedy generation under one fixed
  few-shot prompt — `qa_shots` (3) questions of the same probe with their first gold answers as earlier turns of
  the conversation, in the chat template of the model scored — the same prompt for base and tuned model, so the
  demonstrations, not each model's habits, set the answer format. (A demonstration question is itself scored
  with the next fixed demonstration in its place.) Zero-shot `exact_match` and `contains` are format-sensitive
  like `gold_nll`: a model that learned to answer in one short line gains exact matches and loses the long
  replies that happened to contain the answer, knowing no more or less.
`prompt(question)` is `--qa-prompt` with `{question}` filled in (default: the question alone).

Perplexity (`--text FILE`): `.txt` files are one document; `.jsonl`/`.json` files hold one document per
record in the `text` field. Each document is tokenized as the model's tokenizer does by default and cut
into non-overlapping windows of `window` tokens; every token but a window's first is predicted.
Perplexity = exp(total NLL / predicted tokens).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from ..data.formats import Conversation, Message
from ..data.load import expand_paths, read_records
from ..data.pipeline import DataReport, encode_conversations, keep_examples
from ..config import DataConfig
from ..data.tokenize import Example
from ..data.validate import DataError, InvalidLog, Location
from .metrics import contains_answer, exact_match, normalise_answer


@dataclass
class QaItem:
    where: str
    question: str
    answers: list[str]
    prompt: str
    gold: list[Example]  # one tokenized conversation per usable gold answer
    choices: list[Example] = field(default_factory=list)  # one per option, where the record has options
    gold_choices: frozenset[int] = frozenset()  # the options that are gold answers
    shot_prompt: Conversation | None = None  # the fixed few-shot prompt ending with this question (None: no shots)


def _answers(value, where: Location, field: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise DataError(where, "wrong_type", f"{field!r} must be a string or a list of strings")
    answers = [a.strip() for a in value if a.strip()]
    if not answers:
        raise DataError(where, "empty_response", f"{field!r} holds no non-empty answer")
    return answers


def _choices(rec: dict, where: Location, choices_field: str, answers: list[str]) -> list[str]:
    """The record's options ([] where it has none); at least two, one of them a gold answer."""
    if rec.get(choices_field) is None:
        return []
    value = rec[choices_field]
    if not isinstance(value, list) or not all(isinstance(c, str) and c.strip() for c in value) or len(value) < 2:
        raise DataError(where, "wrong_type", f"{choices_field!r} must be a list of at least two non-empty strings")
    golds = {normalise_answer(a) for a in answers}
    if not any(normalise_answer(c) in golds for c in value):
        raise DataError(where, "bad_choices", f"no option in {choices_field!r} is a gold answer")
    return [c.strip() for c in value]


def _qa_record(where: Location, rec, question_field: str, answer_field: str,
               choices_field: str = "choices") -> tuple[str, list[str], list[str]]:
    if isinstance(rec, DataError):
        raise rec
    if not isinstance(rec, dict):
        raise DataError(where, "not_object", f"got {type(rec).__name__}")
    for f in (question_field, answer_field):
        if rec.get(f) is None:
            raise DataError(where, "missing_field", f"{f!r} (set --question-field / --answer-field)")
    question = rec[question_field]
    if not isinstance(question, str) or not question.strip():
        raise DataError(where, "wrong_type", f"{question_field!r} must be a non-empty string")
    answers = _answers(rec[answer_field], where, answer_field)
    return question, answers, _choices(rec, where, choices_field, answers)


def read_qa(inputs: list[str], tokenizer, tmpl, question_field: str = "question", answer_field: str = "answer",
            prompt_format: str = "{question}", limit: int | None = None, skip_invalid: bool = False,
            invalid: InvalidLog | None = None, max_length: int | None = None, seed: int = 0,
            choices_field: str = "choices", distractors: int = 3, shots: int = 3) -> list[QaItem]:
    """The valid QA records of every file (with `limit`: a seeded random sample of that many per file, in file
    order), with their gold answers tokenized for scoring, their options — the record's own, else its first gold
    answer among `distractors` matched ones (`matched_distractors`; 0: none) — and their fixed `shots`-shot
    prompt (`shot_prompts`; 0: none)."""
    from .generalization import sample_records

    if "{question}" not in prompt_format:
        raise ValueError(f"--qa-prompt {prompt_format!r} must contain {{question}}")
    invalid = invalid if invalid is not None else InvalidLog()
    tok_opts = DataConfig(max_length=max_length)

    def valid(path):
        for where, rec in read_records(path):
            try:
                yield where, *_qa_record(where, rec, question_field, answer_field, choices_field)
            except DataError as e:
                if not skip_invalid:
                    raise
                invalid.add(e)

    items: list[QaItem] = []
    for path in expand_paths(inputs):
        records = list(valid(path)) if limit is None else sample_records(valid(path), limit, f"{seed}:{path.name}")
        pool = [answers[0] for _, _, answers, _ in records]
        rng = random.Random(f"{seed}:{path.name}:distractors")
        shot_prompts = qa_shot_prompts([(q, a[0]) for _, q, a, _ in records], prompt_format, shots,
                                       f"{seed}:{path.name}:shots")
        for (where, question, answers, options), shot_prompt in zip(records, shot_prompts, strict=True):
            own = bool(options)
            if not own and distractors:
                wrong = matched_distractors(answers, pool, distractors, rng)
                options = rng.sample([answers[0], *wrong], len(wrong) + 1) if len(wrong) == distractors else []
            prompt = prompt_format.replace("{question}", question)
            convs = [Conversation([Message("user", prompt), Message("assistant", a)], None, where) for a in answers]
            # a gold answer the length policy drops (or that fails to render) is not a usable gold answer
            encoded = encode_conversations(convs, tokenizer, tmpl, tok_opts)
            gold = [ex for _, ex in keep_examples(encoded, True, DataReport())]
            if not gold:
                e = DataError(where, "template", "no gold answer could be tokenized as a response")
                if not skip_invalid:
                    raise e
                invalid.add(e)
                continue
            choices: list[Example] = []
            if options:
                convs = [Conversation([Message("user", prompt), Message("assistant", c)], None, where) for c in options]
                choices = [ex for _, ex in keep_examples(encode_conversations(convs, tokenizer, tmpl, tok_opts), True,
                                                         DataReport())]
                if len(choices) != len(options) and not own:  # a matched distractor too long: no options
                    choices, options = [], []
                elif len(choices) != len(options):
                    e = DataError(where, "template", "an option could not be tokenized as a response (too long?)")
                    if not skip_invalid:
                        raise e
                    invalid.add(e)
                    continue
            golds = {normalise_answer(a) for a in answers}
            items.append(QaItem(str(where), question, answers, prompt, gold, choices,
                                frozenset(i for i, c in enumerate(options) if normalise_answer(c) in golds),
                                shot_prompt))
    return items


def qa_shot_prompts(pairs: list[tuple[str, str]], prompt_format: str, shots: int,
                    seed: str) -> list[Conversation | None]:
    """For each (question, first gold answer): the fixed few-shot prompt ending with its question — `shots`
    demonstrations drawn once (seeded) from `pairs`, the same for every question; a question that is itself a
    demonstration gets the next drawn one in its place. None where fewer than one other question exists."""
    drawn = random.Random(seed).sample(range(len(pairs)), min(shots + 1, len(pairs))) if shots else []

    def turn(question: str) -> Message:
        return Message("user", prompt_format.replace("{question}", question))

    out: list[Conversation | None] = []
    for i, (question, _) in enumerate(pairs):
        demos = [j for j in drawn if j != i][:shots]
        msgs = [m for j in demos for m in (turn(pairs[j][0]), Message("assistant", pairs[j][1], train=False))]
        out.append(Conversation([*msgs, turn(question)], None, None) if demos else None)
    return out


def _form(answer: str) -> tuple[bool, int, int]:
    norm = normalise_answer(answer)
    return norm.replace(" ", "").replace(".", "").replace("-", "").isdigit(), len(norm.split()), len(norm)


def matched_distractors(answers: list[str], pool: list[str], k: int, rng: random.Random) -> list[str]:
    """`k` gold answers of other questions shaped like this question's first one — a number for a number, then
    the nearest word count, then the nearest length (ties in a seeded order) — none of them one of its golds:
    options of the same form, so a preference for short or long answers moves them all alike."""
    golds = {normalise_answer(a) for a in answers}
    numeric, words, chars = _form(answers[0])
    seen, ranked = set(), []
    for cand in pool:
        norm = normalise_answer(cand)
        if norm in golds or norm in seen or not norm:
            continue
        seen.add(norm)
        c_numeric, c_words, c_chars = _form(cand)
        ranked.append(((c_numeric != numeric, abs(c_words - words), abs(c_chars - chars), rng.random()), cand))
    return [cand for _, cand in sorted(ranked)[:k]]


def choice_correct(items: list[QaItem], nlls) -> list[float | None]:
    """Per question: 1.0 when its option with the lowest mean NLL is a gold one, else 0.0; None without options.
    `nlls` are the flat per-option NLLs in `items` order."""
    out, k = [], 0
    for it in items:
        if not it.choices:
            out.append(None)
            continue
        means = [n.mean for n in nlls[k:k + len(it.choices)]]
        k += len(it.choices)
        out.append(float(min(range(len(means)), key=means.__getitem__) in it.gold_choices))
    return out


def qa_rows(items: list[QaItem], gold_nll: list[float], generations: list[str],
            choice: list[float | None] | None = None, shot_generations: list[str | None] | None = None) -> list[dict]:
    """Per question (with its text and gold answers): gold_nll (min over gold answers), exact_match, contains,
    choice_correct (None without options), generation."""
    choice = choice or [None] * len(items)
    shot_generations = shot_generations or [None] * len(items)
    return [{"where": it.where, "question": it.question, "answers": list(it.answers), "gold_nll": nll,
             "exact_match": float(exact_match(gen, it.answers)),
             "contains": float(contains_answer(gen, it.answers)), "choice_correct": c,
             "few_shot_exact_match": None if shot is None else float(exact_match(shot, it.answers)),
             "few_shot_contains": None if shot is None else float(contains_answer(shot, it.answers)),
             "generation": gen, "few_shot_generation": shot}
            for it, nll, gen, c, shot in zip(items, gold_nll, generations, choice, shot_generations, strict=True)]


def min_gold_nll(items: list[QaItem], nlls) -> list[float]:
    """Fold the flat per-gold NLLs (in `items` order) into the per-question minimum of mean NLLs."""
    out, k = [], 0
    for it in items:
        out.append(min(n.mean for n in nlls[k:k + len(it.gold)]))
        k += len(it.gold)
    return out


QA_METRICS = ("choice_accuracy", "few_shot_exact_match", "few_shot_contains", "gold_nll", "exact_match", "contains")
QA_PERCENT = frozenset(QA_METRICS) - {"gold_nll"}
# what a probe's forgetting is read from, preferred first: measures a change of answer style cannot move alone
FORMAT_INDEPENDENT = ("choice_accuracy", "few_shot_exact_match")


def headline_measure(summary: dict) -> str | None:
    """The first `FORMAT_INDEPENDENT` measure a probe's `summarise_qa` has a value for (None: neither)."""
    return next((k for k in FORMAT_INDEPENDENT if summary.get(k) is not None), None)
# a change of answer style alone moves these: shown, never read as better/worse
FORMAT_SENSITIVE = frozenset({"gold_nll", "exact_match", "contains"})


def qa_values(rows: list[dict], metric: str) -> list[float | None]:
    return [r["choice_correct" if metric == "choice_accuracy" else metric] for r in rows]


def summarise_qa(rows: list[dict]) -> dict:
    """{"n", metric: mean over the questions it applies to (None where none), "n_choice": questions with options,
    "n_few_shot": questions with a few-shot prompt}"""
    out = {"n": len(rows)}
    for m in QA_METRICS:
        values = [v for v in qa_values(rows, m) if v is not None]
        out[m] = sum(values) / len(values) if values else None
    out["n_choice"] = sum(r["choice_correct"] is not None for r in rows)
    out["n_few_shot"] = sum(r.get("few_shot_exact_match") is not None for r in rows)
    return out


# ---- perplexity -----------------------------------------------------------------------------------------------
def read_text_windows(path: str | Path, tokenizer, window: int = 1024, text_field: str = "text",
                      limit: int | None = None) -> list[Example]:
    """Documents of a text file cut into windows of `window` tokens (all tokens scored)."""
    if window < 2:
        raise ValueError("--text-window must be at least 2 tokens")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix in (".jsonl", ".json", ".csv", ".parquet"):
        docs = []
        for where, rec in islice(read_records(path), limit):
            if isinstance(rec, DataError):
                raise rec
            if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                raise DataError(where, "missing_field", f"{text_field!r} (a string) for perplexity")
            docs.append(rec[text_field])
    else:
        try:
            docs = [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise DataError(Location(str(path)), "non_utf8", f"byte 0x{e.object[e.start]:02x}") from None
    windows = []
    for doc in docs:
        ids = tokenizer(doc).input_ids
        for s in range(0, len(ids), window):
            chunk = ids[s:s + window]
            if len(chunk) >= 2:
                windows.append(Example(chunk, list(chunk)))
    if not windows:
        raise ValueError(f"{path}: no text to score (need at least 2 tokens)")
    return windows


def summarise_text(nlls) -> dict:
    total, tokens = sum(n.total for n in nlls), sum(n.tokens for n in nlls)
    nll = total / tokens
    return {"windows": len(nlls), "tokens": tokens, "nll": nll, "perplexity": math.exp(nll)}
