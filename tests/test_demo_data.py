"""The embedded demo data set (determinism, splits, answers that check)."""

from __future__ import annotations

import json
import re

import pytest

from sftlab.demo_data import (FAMILIES, HELDOUT_TASKS, TRAIN_TASKS, build_demo_data, check, sample_family,
                              write_demo_data)
from sftlab.evaluate.metrics import normalise_answer


@pytest.fixture(scope="module")
def demo():
    return build_demo_data(seed=0)


def _user(rec):
    return rec["messages"][0]["content"]


def _nums(text):
    return [int(x) for x in re.findall(r"\d+", text)]


def _quoted_or_after_colon(text):
    m = re.search(r'"([^"]+)"', text)
    return m.group(1) if m else text.split(":", 1)[1].split("\n")[0].strip()


def _solve(rec) -> str:
    """An independent solver that reads the task input back out of the prompt text."""
    task, p = rec["task"], _user(rec)
    if task == "add":
        a, b = _nums(p)
        return str(a + b)
    if task == "subtract":
        a, b = _nums(p)
        return str(b - a) if " from " in p else str(a - b)  # "Subtract b from a", "take b away from a"
    if task == "larger":
        return str(max(_nums(p)))
    if task == "parity":
        n = _nums(p)[0]
        return "yes" if ("even" in p) == (n % 2 == 0) else "no"
    if task == "date_format":
        y, m, d = re.search(r"(\d{4})-(\d\d)-(\d\d)", p).groups()
        return f"{d}/{m}/{y}"
    if task in ("count_words", "first_word", "last_word"):
        s = p.split("Sentence: ")[1].split("\n")[0] if p.startswith("Sentence:") else _quoted_or_after_colon(p)
        words = s.split()
        return {"count_words": str(len(words)), "first_word": words[0], "last_word": words[-1]}[task]
    if task == "sort_words":
        words = re.findall(r"[a-z]+", p.split(":")[-1] if ":" in p else p.split("words ")[1].split(" from")[0])
        return ", ".join(sorted(words))
    if task == "name_format":
        first, last = re.search(r'(?:"|Reformat |Name: )([A-Z][a-z]+) ([A-Z][a-z]+)', p).groups()
        return f"{last}, {first}"
    if task == "repeat_word":
        m = re.search(r'"([a-z]+)"', p) or re.search(r"(?:Say|word) ([a-z]+)", p)
        return " ".join([m.group(1)] * _nums(p)[0])
    if task == "email_domain":
        return re.search(r"@([a-z.]+[a-z])", p).group(1)
    if task == "fruit_or_animal":
        from sftlab.demo_data import FRUITS

        return "fruit" if any(re.search(rf"\b{f}\b", p) for f in FRUITS) else "animal"
    if task == "antonym":
        from sftlab.demo_data import ANTONYMS

        word = re.search(r'"([a-z]+)"|Opposite of ([a-z]+):', p)
        word = word.group(1) or word.group(2)
        return next(b if a == word else a for a, b in ANTONYMS if word in (a, b))
    return rec["reference"]  # sentiment is checked against its word lists below


def test_deterministic_and_seeded(demo):
    assert build_demo_data(seed=0) == demo
    assert json.dumps(build_demo_data(seed=0)) == json.dumps(demo)  # same order too
    other = build_demo_data(seed=1)
    assert other["train"] != demo["train"]
    assert {r["task"] for r in other["train"]} == {r["task"] for r in demo["train"]}


def test_split_sizes_and_families(demo):
    assert len(FAMILIES) >= 10 and len(HELDOUT_TASKS) >= 2 and len(TRAIN_TASKS) >= 8
    assert len(demo["train"]) == 32 * len(TRAIN_TASKS)
    assert len(demo["heldout_instances"]) == 8 * len(TRAIN_TASKS)
    assert len(demo["heldout_tasks"]) == 16 * len(HELDOUT_TASKS)
    assert {r["task"] for r in demo["train"]} == set(TRAIN_TASKS)
    assert {r["task"] for r in demo["heldout_instances"]} == set(TRAIN_TASKS)
    assert {r["task"] for r in demo["heldout_tasks"]} == set(HELDOUT_TASKS)
    for task in TRAIN_TASKS:  # several instruction phrasings per family, not one prompt
        prefixes = {_user(r)[:12] for r in demo["train"] if r["task"] == task}
        assert len(prefixes) >= 3, task


def test_splits_are_disjoint(demo):
    train_prompts = {_user(r) for r in demo["train"]}
    assert len(train_prompts) == len(demo["train"])
    assert not train_prompts & {_user(r) for r in demo["heldout_instances"]}
    # Not only the prompts: the inputs themselves are new (no held-out instance is a rephrased training one).
    for task in ("add", "larger", "date_format"):
        seen = {tuple(_nums(_user(r))) for r in demo["train"] if r["task"] == task}
        held = {tuple(_nums(_user(r))) for r in demo["heldout_instances"] if r["task"] == task}
        assert held and not seen & held, task
    def antonym_pair(rec):
        m = re.search(r'"([a-z]+)"|Opposite of ([a-z]+):', _user(rec))
        return frozenset({m.group(1) or m.group(2), rec["reference"]})

    seen = {antonym_pair(r) for r in demo["train"] if r["task"] == "antonym"}
    held = {antonym_pair(r) for r in demo["heldout_instances"] if r["task"] == "antonym"}
    assert len(held) == 8 and not seen & held


def test_every_answer_checks_and_is_recomputed_from_the_prompt(demo):
    for split, rows in demo.items():
        for rec in rows:
            answer = rec["messages"][-1]["content"]
            assert rec["messages"][-1]["role"] == "assistant" and answer == rec["reference"]
            assert check(answer, rec), (split, rec)
            assert normalise_answer(_solve(rec)) == normalise_answer(answer), (split, rec)
            assert not check(answer + " and more", rec)
    sentiments = {r["reference"] for r in demo["train"] if r["task"] == "sentiment"}
    assert sentiments == {"positive", "negative"}
    for rec in demo["train"]:
        if rec["task"] == "sentiment":
            from sftlab.demo_data import NEGATIVE, POSITIVE

            words = set(re.findall(r"[a-z]+", _user(rec).lower()))
            assert bool(words & set(POSITIVE)) == (rec["reference"] == "positive") != bool(words & set(NEGATIVE))


def test_antonym_answers_are_unambiguous():
    from sftlab.demo_data import ANTONYMS

    words = [w for pair in ANTONYMS for w in pair]
    assert len(words) == len(set(words))  # each word has exactly one opposite in the list


def test_family_too_small_raises():
    with pytest.raises(ValueError, match="fewer than"):
        sample_family("antonym", 50)  # 49 pairs


def test_written_files_load_and_tokenize_through_the_pipeline(tmp_path, tokenizer):
    from sftlab.config import DataConfig
    from sftlab.data.pipeline import DataReport, iter_examples

    paths = write_demo_data(tmp_path / "demo", seed=0)
    assert sorted(p.name for p in paths.values()) == ["general.jsonl", "heldout_instances.jsonl", "heldout_tasks.jsonl",
                                                      "train.jsonl"]
    report = DataReport()
    examples = list(iter_examples([str(paths["train"])], tokenizer, DataConfig(task_field="task"), report))
    assert report.kept == len(examples) == 32 * len(TRAIN_TASKS) and report.invalid.total == 0
    assert report.duplicates == 0
    assert set(report.tasks) == set(TRAIN_TASKS)
    first = json.loads(paths["train"].read_text().splitlines()[0])
    trained = tokenizer.decode([t for t in examples[0].labels if t != -100])
    assert trained == first["reference"] + "<|im_end|>"
    from sftlab.data.template import resolve_template
    from sftlab.evaluate.forgetting import read_qa

    probe = read_qa([str(paths["general"])], tokenizer, resolve_template("default", tokenizer))
    assert len(probe) == 200 and all(len(it.choices) == 4 and len(it.gold_choices) == 1 for it in probe)


def test_general_probe_is_well_formed_and_seeded():
    from sftlab.data.answers import normalise_answer
    from sftlab.demo_data import GENERAL_FACTS, arithmetic_questions, general_probe

    rows = general_probe(0)
    assert len(GENERAL_FACTS) == 40 and len(rows) == 200 and len({r["question"] for r in rows}) == 200
    for question, answer, wrong in arithmetic_questions():  # the answer is the arithmetic, the options near it
        a, word, b = question.removeprefix("What is ").rstrip("?").split()
        assert int(answer) == {"plus": int(a) + int(b), "minus": int(a) - int(b), "times": int(a) * int(b)}[word]
        assert all(w != answer and int(w) >= 0 and abs(int(w) - int(answer)) in (1, 2, 10) for w in wrong)
        assert len(set(wrong)) == 3
    for r in rows:
        assert len(r["choices"]) == 4 and sum(normalise_answer(c) == normalise_answer(r["answer"])
                                              for c in r["choices"]) == 1
    assert general_probe(0) == rows and general_probe(1) != rows  # option order is seeded
    assert {r["choices"].index(r["answer"]) for r in rows} == {0, 1, 2, 3}  # the gold option is not always first
