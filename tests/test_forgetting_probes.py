"""Forgetting probes that a change of answer format cannot fake: a model tuned only to answer tersely makes every
short gold answer likelier (gold NLL drops) without knowing more; the options-ranking accuracy does not move, and
neither the terminal nor the report calls the gold-NLL drop an improvement."""

from __future__ import annotations

import io
import json
import random

import pytest
from rich.console import Console

from sftlab.config import DataConfig, EvalConfig, load_config
from sftlab.evaluate import forgetting
from sftlab.evaluate.evaluate import evaluate, print_summary
from sftlab.report.html import Run, section_forgetting

ANSWERS = "red blue green cat dog sun moon tree".split()
FILLER = "alpha beta gamma delta omega sigma kappa theta lambda zeta".split()


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def terse_training_data(path, n: int = 64, seed: int = 0):
    """Questions answered by one arbitrary word: the model can learn the format, not the answers."""
    rng = random.Random(seed)
    return write_jsonl(path, [{"messages": [
        {"role": "user", "content": "Question: " + " ".join(rng.sample(FILLER, 3)) + "?"},
        {"role": "assistant", "content": rng.choice(ANSWERS)}]} for _ in range(n)])


def probe(path, n: int = 40, seed: int = 1):
    """Questions with a one-word gold answer among four one-word options (the gold one at a random place)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        options = rng.sample(ANSWERS, 4)
        rows.append({"question": "Question: " + " ".join(rng.sample(FILLER, 3)) + "?", "answer": options[0],
                     "choices": rng.sample(options, 4)})
    return write_jsonl(path, rows)


def test_read_qa_options_and_their_errors(tmp_path, tokenizer):
    from sftlab.data.template import resolve_template
    from sftlab.data.validate import DataError

    tmpl = resolve_template("default", tokenizer)
    good = write_jsonl(tmp_path / "good.jsonl", [{"question": "Colour of the sky?", "answer": ["Blue"],
                                                  "choices": ["green", "blue.", "red"]},
                                                 {"question": "2+2?", "answer": "4"}])
    items = forgetting.read_qa([str(good)], tokenizer, tmpl)
    assert len(items[0].choices) == 3 and items[0].gold_choices == frozenset({1})
    assert items[1].choices == [] and items[1].gold_choices == frozenset()
    for rec, reason in (({"question": "q?", "answer": "a", "choices": ["b", "c"]}, "no option in 'choices' is a gold"),
                        ({"question": "q?", "answer": "a", "choices": "a"}, "list of at least two"),
                        ({"question": "q?", "answer": "a", "choices": ["a"]}, "list of at least two")):
        bad = write_jsonl(tmp_path / "bad.jsonl", [rec])
        with pytest.raises(DataError, match=reason) as e:
            forgetting.read_qa([str(bad)], tokenizer, tmpl)
        assert "bad.jsonl:1" in str(e.value)


def test_choice_correct_takes_the_lowest_mean_nll():
    from sftlab.evaluate.scoring import Nll

    items = [forgetting.QaItem("f:1", "q", ["a"], "q", [], [None] * 3, frozenset({1})),
             forgetting.QaItem("f:2", "q", ["a"], "q", [], [], frozenset()),
             forgetting.QaItem("f:3", "q", ["a"], "q", [], [None] * 2, frozenset({0}))]
    nlls = [Nll(3.0, 1), Nll(1.0, 1), Nll(2.0, 1), Nll(0.5, 1), Nll(0.2, 1)]
    assert forgetting.choice_correct(items, nlls) == [1.0, None, 0.0]


def test_terse_tuning_lowers_gold_nll_but_not_as_knowledge(tmp_path, tiny_model_dir):
    from sftlab.train.loop import train

    data = terse_training_data(tmp_path / "terse.jsonl")
    cfg = load_config(None, [f"output_dir={tmp_path / 'tuned'}", f"model.path={tiny_model_dir}", f"data.train=[{data}]",
                             "train.epochs=4", "train.batch_size=8", "train.lr=3e-3", "train.warmup_ratio=0",
                             "train.seed=0", "model.attn_implementation=eager"])
    train(cfg)
    qa = probe(tmp_path / "probe.jsonl")
    m = evaluate(EvalConfig(general=[str(qa)], qa_max_new_tokens=2, bootstrap=1000), str(tmp_path / "tuned" / "model"),
                 tmp_path / "eval", DataConfig(), base=str(tiny_model_dir), console=quiet())
    d = m["deltas"]["general"]["qa"][str(qa)]
    assert d["gold_nll"]["ci95"][1] < 0  # the gold answers got much likelier: the format was learned
    acc = d["choice_accuracy"]
    assert acc["n"] == 40 and not acc["ci95"][0] > 0  # ... but ranking the options did not get better
    res = m["results"]["model"]["general"]["qa"][str(qa)]
    assert res["n_choice"] == 40 and 0.0 <= res["choice_accuracy"] <= 1.0
    table = quiet()
    print_summary(m, table)
    assert "gold_nll (format-sensitive)" in table.file.getvalue() and "choice_accuracy" in table.file.getvalue()
    assert res["n_few_shot"] == 40 and d["few_shot_exact_match"]["n"] == 40  # every question got the fixed prompt
    rows = [json.loads(line) for line in (tmp_path / "eval" / "examples.jsonl").open()]
    assert all(r["few_shot_generation"] is not None for r in rows if r["kind"] == "qa")
    html = section_forgetting([Run("terse", tmp_path, eval=m)])
    for metric in ("gold_nll", "exact_match", "contains"):  # shown, never coloured
        row = next(r for r in html.split("<tr>") if f">{metric} (format-sensitive)<" in r)
        assert "class='good'" not in row and "class='bad'" not in row


def test_few_shot_prompt_is_fixed_and_never_shows_the_question_its_answer():
    pairs = [(f"q{i}", f"a{i}") for i in range(10)]
    prompts = forgetting.qa_shot_prompts(pairs, "Q: {question}", 3, "seed")
    demos = [[m.content for m in p.messages[:-1]] for p in prompts]
    drawn = {tuple(d) for d in demos}
    assert len(drawn) <= 4  # one fixed prompt, and for the demonstrated questions one neighbour swapped in
    for i, (p, d) in enumerate(zip(prompts, demos)):
        assert [m.role for m in p.messages] == ["user", "assistant"] * 3 + ["user"]
        assert p.messages[-1].content == f"Q: q{i}" and f"a{i}" not in d and f"Q: q{i}" not in d
        assert all(m.train is False for m in p.messages if m.role == "assistant")  # context, never scored
        assert d[1] == f"a{d[0][4:]}"  # a demonstration is a question with its own gold answer
    common = max(drawn, key=lambda t: sum(tuple(d) == t for d in demos))
    assert sum(tuple(d) == common for d in demos) == 7  # the 7 questions not demonstrated share one prompt
    assert forgetting.qa_shot_prompts(pairs, "{question}", 0, "s") == [None] * 10
    assert forgetting.qa_shot_prompts(pairs[:1], "{question}", 3, "s") == [None]  # no other question to show


def test_few_shot_rows_score_the_few_shot_generation():
    items = [forgetting.QaItem("f:1", "q", ["Paris"], "q", []), forgetting.QaItem("f:2", "q2", ["Rome"], "q2", [])]
    rows = forgetting.qa_rows(items, [1.0, 2.0], ["The capital is Paris.", "Rome"], None, ["Paris", None])
    assert (rows[0]["exact_match"], rows[0]["contains"], rows[0]["few_shot_exact_match"]) == (0.0, 1.0, 1.0)
    assert rows[1]["few_shot_exact_match"] is None and rows[1]["exact_match"] == 1.0
    s = forgetting.summarise_qa(rows)
    assert s["few_shot_exact_match"] == 1.0 and s["n_few_shot"] == 1 and s["exact_match"] == 0.5


def test_matched_distractors_have_the_gold_answers_form():
    pool = ["1969", "Paris", "George Washington", "42", "the Eiffel Tower", "Abraham Lincoln", "1776", "red",
            "Paris"]
    rng = random.Random(0)
    assert sorted(forgetting.matched_distractors(["1945"], pool, 3, rng)) == ["1776", "1969", "42"]
    two_words = forgetting.matched_distractors(["Thomas Jefferson"], pool, 2, rng)
    assert sorted(two_words) == ["Abraham Lincoln", "George Washington"]
    # never one of the question's own golds, never twice the same answer
    got = forgetting.matched_distractors(["paris", "Paris, France"], pool, 8, rng)
    assert "Paris" not in got and len(got) == len(set(got)) == 7
    assert forgetting.matched_distractors(["1945"], pool, 3, random.Random(1)) == \
        forgetting.matched_distractors(["1945"], pool, 3, random.Random(1))


def test_free_form_probe_gets_matched_options(shared_data, tokenizer):
    """NQ-open has no options: each question's first gold answer is ranked among 3 other questions' golds."""
    from sftlab.data.template import resolve_template

    tmpl = resolve_template("default", tokenizer)
    items = forgetting.read_qa([str(shared_data / "nq-open" / "dev.jsonl")], tokenizer, tmpl, limit=30, seed=0)
    assert len(items) == 30 and all(len(it.choices) == 4 and len(it.gold_choices) >= 1 for it in items)
    off = forgetting.read_qa([str(shared_data / "nq-open" / "dev.jsonl")], tokenizer, tmpl, limit=30, seed=0,
                             distractors=0)
    assert all(it.choices == [] for it in off)
