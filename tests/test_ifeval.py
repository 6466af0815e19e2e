"""IFEval: each checker passes and fails where it should, strict vs loose as upstream, the aggregation, compare,
the responses file round trip and `sftlab ifeval score --json`. Offline: the Punkt model comes from a wheel."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sftlab.cli import app
from sftlab.ifeval.responses import generate_responses, score_file, write_responses
from sftlab.ifeval.score import (SHARED_INPUTS, IFEvalPrompt, compare, figures, load_prompts, match_responses,
                                 resolve_inputs, score)
from sftlab.ifeval.checkers import ensure_punkt, follows, instruction_registry, loose_variants

LONG = " ".join(["word"] * 310)
# instruction id -> (kwargs, a response that follows it, one that does not)
CASES = {
    "change_case:capital_word_frequency": ({"capital_relation": "less than", "capital_frequency": 3},
                                           "The CAT sat on the MAT.", "THE CAT SAT ON THE MAT."),
    "change_case:english_capital": ({}, "THE WEATHER TODAY IS SUNNY AND WARM, SO WE WILL GO TO THE BEACH WITH OUR FRIENDS.",
                                    "The weather today is sunny and warm, so we will go to the beach with our friends."),
    "change_case:english_lowercase": ({}, "the weather today is sunny and warm, so we will go to the beach with our friends.",
                                      "The weather today is sunny and warm, so we will go to the beach with our friends."),
    "combination:repeat_prompt": ({"prompt_to_repeat": "Write a poem about the sea."},
                                  "Write a poem about the sea. The sea is blue.", "The sea is blue."),
    "combination:two_responses": ({}, "First answer here.\n******\nSecond, different answer.",
                                  "Only one answer here."),
    "detectable_content:number_placeholders": ({"num_placeholders": 2}, "Dear [name], see you at [address].",
                                               "Dear [name], see you soon."),
    "detectable_content:postscript": ({"postscript_marker": "P.S."}, "Hello there.\n\nP.S. See you soon.",
                                      "Hello there. See you soon."),
    "detectable_format:constrained_response": ({}, "My answer is yes.", "Absolutely, I agree."),
    "detectable_format:json_format": ({}, '```json\n{"answer": 42}\n```', "The answer is 42."),
    "detectable_format:multiple_sections": ({"section_spliter": "SECTION", "num_sections": 2},
                                            "SECTION 1\nIntro text.\nSECTION 2\nMore text.",
                                            "SECTION 1\nAll text in one section."),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, "* first point\n* second point",
                                              "* first point\n* second point\n* third point"),
    "detectable_format:number_highlighted_sections": ({"num_highlights": 2}, "*Intro* text and *Body* text.",
                                                      "*Intro* text only."),
    "detectable_format:title": ({}, "<<A Poem>>\nRoses are red.", "A Poem\nRoses are red."),
    "keywords:existence": ({"keywords": ["ocean", "tide"]}, "The ocean has a tide.", "The ocean is calm."),
    "keywords:forbidden_words": ({"forbidden_words": ["rock"]}, "We like jazz music.", "We like rock music."),
    "keywords:frequency": ({"relation": "at least", "keyword": "story", "frequency": 2},
                           "A story within a story.", "A story within a tale."),
    "keywords:letter_frequency": ({"let_relation": "at least", "letter": "z", "let_frequency": 3},
                                  "Zany zebras zoom.", "Happy horses run."),
    "language:response_language": ({"language": "de"},
                                   "Das ist eine Antwort auf Deutsch, und sie ist ziemlich lang geschrieben.",
                                   "This is an answer written in English, and it is quite long."),
    "length_constraints:nth_paragraph_first_word": ({"first_word": "weekend", "num_paragraphs": 2, "nth_paragraph": 2},
                                                    "Saturday is near.\n\nWeekend plans are set.",
                                                    "Saturday is near.\n\nPlans are set."),
    "length_constraints:number_paragraphs": ({"num_paragraphs": 2}, "First paragraph.\n***\nSecond paragraph.",
                                             "First paragraph.\n\nSecond paragraph."),
    "length_constraints:number_sentences": ({"relation": "less than", "num_sentences": 3},
                                            "Dr. Smith went home. He was tired.",
                                            "One. Two. Three. Four."),
    "length_constraints:number_words": ({"relation": "at least", "num_words": 300}, LONG, "Too short."),
    "punctuation:no_comma": ({}, "No commas here at all.", "Well, there is one."),
    "startend:end_checker": ({"end_phrase": "Is there anything else I can help with?"},
                             "Done. Is there anything else I can help with?", "Is there anything else I can help with? Done."),
    "startend:quotation": ({}, '"Wrapped in quotes."', "Not wrapped."),
}


@pytest.mark.parametrize("instruction_id", sorted(CASES))
def test_each_checker_passes_and_fails(instruction_id):
    kwargs, good, bad = CASES[instruction_id]
    assert follows(instruction_id, kwargs, "a prompt", good) == (True, True)
    assert follows(instruction_id, kwargs, "a prompt", bad)[0] is False


def test_cases_cover_every_instruction_of_the_data(shared_data):
    ids = {i for p in load_prompts(shared_data / "ifeval" / "input_data.jsonl") for i in p.instruction_ids}
    assert len(ids) == 25 and ids == set(CASES) <= set(instruction_registry())


def test_empty_response_follows_nothing():
    assert follows("punctuation:no_comma", {}, "p", "  \n ") == (False, False)


def test_loose_passes_after_removing_a_first_line_only():
    response = 'Sure, here it is:\n"Wrapped in quotes."'
    assert follows("startend:quotation", {}, "p", response) == (False, True)


def test_loose_passes_after_removing_asterisks_only():
    kwargs = {"end_phrase": "Is there anything else I can help with?"}
    response = "Done. **Is there anything else I can help with?**"
    assert follows("startend:end_checker", kwargs, "p", response) == (False, True)


def test_loose_variants_are_upstreams_eight():
    assert loose_variants("first *a*\nmiddle\nlast*") == [
        "first *a*\nmiddle\nlast*", "first a\nmiddle\nlast", "middle\nlast*", "first *a*\nmiddle", "middle",
        "middle\nlast", "first a\nmiddle", "middle"]


def test_punkt_model_is_written_offline_and_splits_like_nltk(tmp_path):
    import nltk

    root = ensure_punkt(tmp_path)
    try:
        assert sorted(p.name for p in (root / "tokenizers" / "punkt_tab" / "english").iterdir()) == [
            "abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt"]
        assert nltk.sent_tokenize("Dr. Smith went home. He was tired.") == ["Dr. Smith went home.", "He was tired."]
        assert ensure_punkt(tmp_path) == root  # a second call finds it in place
    finally:
        nltk.data.path.remove(str(root))


def _prompt(key, *ids):
    return IFEvalPrompt(key, f"prompt {key}", ids, tuple({} for _ in ids))


def test_prompt_level_and_instruction_level_aggregation():
    prompts = [_prompt(1, "punctuation:no_comma", "change_case:english_lowercase"),
               _prompt(2, "punctuation:no_comma"),
               _prompt(3, "punctuation:no_comma", "change_case:english_lowercase", "startend:quotation")]
    responses = ["all lowercase, but a comma",  # 1 of 2
                 "no comma at all",             # 1 of 1
                 'Here:\n"quoted lowercase"']  # strict: no_comma only; loose: all three
    result = score(prompts, responses)
    assert result["rows"][0] == {"key": 1, "instructions": ["punctuation:no_comma", "change_case:english_lowercase"],
                                 "strict": [False, True], "loose": [False, True]}
    assert (result["prompts"], result["instructions"]) == (3, 6)
    assert result["prompt_strict"] == pytest.approx(1 / 3)
    assert result["instruction_strict"] == pytest.approx(3 / 6)
    assert result["prompt_loose"] == pytest.approx(2 / 3)
    assert result["instruction_loose"] == pytest.approx(5 / 6)
    assert result["by_instruction"]["punctuation:no_comma"] == {"n": 3, "strict": pytest.approx(2 / 3),
                                                               "loose": pytest.approx(2 / 3)}
    assert result["by_family"]["change_case"] == {"n": 2, "strict": 0.5, "loose": 1.0}
    assert figures(result["rows"])["by_instruction"] == result["by_instruction"]


def test_load_prompts_reads_the_541_and_samples_seeded(shared_data):
    path = shared_data / "ifeval" / "input_data.jsonl"
    prompts = load_prompts(path)
    assert len(prompts) == 541 and sum(len(p.instruction_ids) for p in prompts) == 834
    sample = load_prompts(path, limit=20, seed=0)
    assert sample == load_prompts(path, limit=20, seed=0) != load_prompts(path, limit=20, seed=1)
    order = [p.key for p in prompts]
    assert [order.index(p.key) for p in sample] == sorted(order.index(p.key) for p in sample)


def test_default_inputs_resolve_beside_the_checkout_from_any_directory(tmp_path, monkeypatch, shared_data):
    monkeypatch.chdir(tmp_path)  # no ../shared here
    assert resolve_inputs(SHARED_INPUTS).resolve() == (shared_data / "ifeval" / "input_data.jsonl").resolve()
    assert len(load_prompts(SHARED_INPUTS, limit=3)) == 3
    with pytest.raises(ValueError, match=r"nothere\.jsonl: no such IFEval inputs file"):
        load_prompts(tmp_path / "nothere.jsonl")


def test_compare_pairs_prompts_and_weights_instructions():
    base = [{"key": k, "instructions": ["a:x", "b:y"], "strict": [False, False], "loose": [True, False]}
            for k in range(10)]
    tuned = [{"key": k, "instructions": ["a:x", "b:y"], "strict": [True, k < 5], "loose": [True, False]}
             for k in range(10)]
    d = compare(base, tuned, n_resamples=200, seed=0)
    assert d["prompt_strict"]["delta"] == pytest.approx(0.5)
    assert d["instruction_strict"]["delta"] == pytest.approx(0.75)
    assert d["prompt_loose"] == {"delta": 0.0, "ci95": [0.0, 0.0], "n": 10}
    lo, hi = d["prompt_strict"]["ci95"]
    assert 0 < lo <= 0.5 <= hi <= 1
    assert d["by_instruction"]["a:x"]["strict"]["delta"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="different IFEval prompts"):
        compare(base, tuned[::-1])


def test_match_responses_by_prompt():
    prompts = [_prompt(1, "punctuation:no_comma"), _prompt(2, "punctuation:no_comma")]
    rows = [{"prompt": "prompt 2", "response": "b"}, {"prompt": "prompt 1", "response": "a"}]
    assert match_responses(prompts, rows) == (prompts, ["a", "b"])
    with pytest.raises(ValueError, match="1 of 2 prompts have no response"):
        match_responses(prompts, rows[:1])
    assert match_responses(prompts, rows[:1], partial=True) == (prompts[1:], ["b"])
    with pytest.raises(ValueError, match="not in the inputs"):
        match_responses(prompts, [{"prompt": "other", "response": "x"}])


def test_generate_then_score_file(tmp_path, tiny_model, tokenizer, shared_data):
    inputs = shared_data / "ifeval" / "input_data.jsonl"
    prompts = load_prompts(inputs, limit=2, seed=0)
    seen = []
    replies = generate_responses(tiny_model, tokenizer, "default", prompts, max_new_tokens=4, batch_size=2,
                                 on_batch=seen.append)
    assert len(replies) == 2 and sum(seen) == 2 and all(isinstance(r, str) for r in replies)
    write_responses(tmp_path / "r.jsonl", prompts, replies)
    result = score_file(tmp_path / "r.jsonl", inputs, partial=True)
    assert result["prompts"] == 2 and [r["key"] for r in result["rows"]] == [p.key for p in prompts]


def test_score_cli_json(tmp_path, shared_data):
    inputs = shared_data / "ifeval" / "input_data.jsonl"
    prompts = load_prompts(inputs)[:2]  # keys 1000 (no comma, 3 highlights, 300+ words) and 1001 (no comma)
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps({"prompt": p.prompt, "response": "Fine words without commas."}) + "\n"
                                 for p in prompts))
    runner = CliRunner()
    result = runner.invoke(app, ["ifeval", "score", str(responses), "--inputs", str(inputs), "--partial", "--json",
                                 "--rows", str(tmp_path / "rows.jsonl")])
    assert result.exit_code == 0, result.output
    figs = json.loads(result.stdout)
    assert (figs["prompts"], figs["instructions"]) == (2, 4)
    assert figs["prompt_strict"] == 0.5 and figs["instruction_strict"] == 0.5
    assert set(figs) >= {"prompt_loose", "instruction_loose", "by_instruction", "by_family"} and "rows" not in figs
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 2
    missing = runner.invoke(app, ["ifeval", "score", str(responses), "--inputs", str(inputs), "--json"])
    assert missing.exit_code == 1 and "539 of 541 prompts have no response" in missing.output


def test_eval_ifeval_tuned_vs_base_in_metrics_examples_and_report(tmp_path, tiny_model_dir, shared_data):
    """`sftlab eval --ifeval`: both models' replies scored; a model compared with itself has zero deltas; the
    rows in examples.jsonl re-score to the figures; the report shows the section."""
    from sftlab.report.html import load_run, render_report

    inputs = shared_data / "ifeval" / "input_data.jsonl"
    out = tmp_path / "ev"
    r = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--base", str(tiny_model_dir), "--out",
                                 str(out), "--ifeval", "--ifeval-inputs", str(inputs), "--ifeval-limit", "3",
                                 "--ifeval-max-new-tokens", "6", "--bootstrap", "50"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    ife = m["ifeval"]
    assert ife["model"] == ife["base"] and ife["model"]["prompts"] == 3
    assert all(ife["deltas"][k]["delta"] == 0 and ife["deltas"][k]["ci95"] == [0, 0]
               for k in ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose"))
    rows = [json.loads(x) for x in open(out / "examples.jsonl")]
    mine = [x for x in rows if x["kind"] == "ifeval" and x["model"] == "model"]
    prompts = load_prompts(inputs, limit=3, seed=0)
    assert [x["prompt"] for x in mine] == [p.prompt for p in prompts]
    rescored = score(prompts, [x["response"] for x in mine])
    assert {k: rescored[k] for k in ("prompt_strict", "instruction_loose")} == \
        {k: ife["model"][k] for k in ("prompt_strict", "instruction_loose")}
    page = render_report([load_run(out)])
    assert "Instruction following (IFEval)" in page and "prompt-level, strict" in page
