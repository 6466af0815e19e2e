"""Answer metrics (normalisation, exact match, containment, ROUGE-L, label sets) and the paired bootstrap."""

from __future__ import annotations

import pytest

from sftlab.evaluate.metrics import (contains_answer, exact_match, exact_match_of_generations, label_set,
                                     normalise_answer, paired_bootstrap_ci, predict_label, rouge_l)


def test_answer_metrics():
    assert exact_match("  The Eiffel-Tower. ", "the eiffeltower")
    assert exact_match("Paris!", ["London", "paris"])
    assert not exact_match("Paris is the answer", "Paris")
    # LCS("the cat sat on the mat", "the cat on the mat") = 5 tokens: P = 1, R = 5/6
    assert rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(2 * (5 / 6) / (1 + 5 / 6))
    assert rouge_l("dog", "the cat") == 0.0
    # numbers keep sign and decimal point; other punctuation goes
    assert not exact_match("-5", "5") and exact_match("\u221212", "-12") and exact_match("x: -5.", "x -5")
    assert not exact_match("3.5", "35") and exact_match("3.5 km.", "3.5 km") and exact_match("1,000", "1000")
    # any script: rouge-score's own tokenizer keeps only [a-z0-9] (non-Latin text scored 0); CJK per character
    assert rouge_l("Привет, мир", "привет мир") == 1.0
    assert rouge_l("我爱北京", "我爱上海") == pytest.approx(0.5)
    from rouge_score import rouge_scorer  # ASCII: the same as rouge-score's default

    ref = rouge_scorer.RougeScorer(["rougeL"]).score("It's 5 o'clock, the cat_sat!", "its 5 oclock the cat sat")
    assert rouge_l("its 5 oclock the cat sat", "It's 5 o'clock, the cat_sat!") == pytest.approx(ref["rougeL"].fmeasure)


def test_label_set_and_accuracy():
    assert label_set(["Positive", "negative", "positive.", "Negative"]) == ["negative", "positive"]
    assert label_set(["a long free answer", "another one"]) is None  # distinct > n / 2
    assert label_set(["yes"] * 10) is None  # one label: nothing to classify
    assert label_set([str(i % 21) for i in range(100)]) is None  # 21 labels > 20
    labels = ["negative", "positive"]
    assert predict_label("Positive.", labels) == "positive"
    assert predict_label("I think it is negative, not positive", labels) == "negative"
    assert predict_label("neutral", labels) is None


def test_paired_bootstrap():
    assert paired_bootstrap_ci([1.0, 2.0, 5.0], [1.0, 2.0, 5.0]) == (0.0, 0.0, 0.0)
    d, lo, hi = paired_bootstrap_ci([1.0, 2.0, 5.0], [1.5, 2.5, 5.5])
    assert d == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    base, tuned = [0, 0, 0, 0, 0, 0], [1, 0, 1, 1, 1, 0]
    d, lo, hi = paired_bootstrap_ci(base, tuned, n_resamples=2000, seed=3)
    assert d == pytest.approx(4 / 6) and 0 <= lo < d < hi <= 1
    assert paired_bootstrap_ci(base, tuned, n_resamples=2000, seed=3) == (d, lo, hi)  # seeded
    # macro over groups: mean of per-group means (1/2 and 1), not the pooled mean
    d, _, _ = paired_bootstrap_ci([0, 0, 0, 0, 0, 0], [1, 0, 1, 1, 1, 1], groups=list("aaaabb"))
    assert d == pytest.approx((3 / 4 + 1) / 2)
    d, _, _ = paired_bootstrap_ci([1, 1], [2, 4], weights=[1, 3])
    assert d == pytest.approx((1 * 1 + 3 * 3) / 4)
    with pytest.raises(ValueError):
        paired_bootstrap_ci([1, 2], [1])


def test_normalise_and_exact_match():
    assert normalise_answer("  Smith,   John. ") == "smith john"
    assert normalise_answer("05/03/2024") == "05032024"
    assert exact_match("Smith, John", "smith john")
    assert not exact_match("John Smith", "Smith, John")
    assert exact_match("Positive.", ["negative", "positive"])
    assert not exact_match("The answer is 68.", "68")
    assert contains_answer("The answer is 68.", "68") and not contains_answer("The answer is 168.", "68")


def test_rouge_l_and_generation_exact_match():
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert rouge_l("a b c", "a b c") == pytest.approx(1.0)
    assert rouge_l("x y", "a b") == 0.0
    rows = [{"generation": g, "reference": r} for g, r in (("1", "1"), ("2", "1"), ("yes", "Yes."), ("x", None))]
    assert exact_match_of_generations(rows) == (2 / 3, 3)  # rows without a reference are not counted
    assert exact_match_of_generations(rows[3:]) == (None, 0)


def test_answer_distribution_majority_baseline_on_an_imbalanced_set():
    from sftlab.data.answers import answer_distribution, answer_warning, degenerate

    refs = ["Positive."] * 14 + ["negative"] * 4 + ["neutral"] * 2  # 70 % / 20 % / 10 %
    d = answer_distribution(refs)
    assert d["labels"] == {"positive": 14, "negative": 4, "neutral": 2} and list(d["labels"]) == ["positive",
                                                                                                     "negative", "neutral"]
    assert d["majority"] == "positive" and d["majority_baseline"] == pytest.approx(0.7) and d["n"] == 20
    assert not d["single_label"] and not d["imbalanced"] and not degenerate(d)
    # always answering the majority label scores exactly the baseline in exact match
    assert sum(exact_match("positive", r) for r in refs) / len(refs) == pytest.approx(d["majority_baseline"])
    skewed = answer_distribution(["yes"] * 8 + ["no"] * 2)
    assert skewed["imbalanced"] and skewed["majority_baseline"] == 0.8 and degenerate(skewed)
    one = answer_distribution(["negative"] * 5)
    assert one["single_label"] and one["majority_baseline"] == 1.0
    assert answer_warning("imdb", one) == ("task 'imdb': 5 of 5 references are 'negative' (one answer only): "
                                           "always answering it scores 100% exact match / accuracy")
    assert answer_distribution([f"answer number {i}" for i in range(10)]) is None  # free text
    assert answer_distribution(["a", "b", "c", "d"] * 6, max_labels=3) is None  # more labels than a label set
    assert answer_distribution(["only"]) is None  # one example says nothing
    assert not degenerate(None)
