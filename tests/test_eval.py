"""Evaluation: task items and metrics, NLL scoring and the `sftlab eval` output."""

from __future__ import annotations

import io
import json
import math

import pytest
from rich.console import Console

from conftest import make_tiny_llama
from sftlab.config import DataConfig
from sftlab.evaluate import generalization
from sftlab.evaluate.scoring import Nll


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- task items ------------------------------------------------------------------------------------------------
def test_limit_is_seeded_sample_in_file_order(tmp_path, tokenizer):
    # sorted by label, as many real files are: the first 6 would all be "negative"
    rows = [{"prompt": f"review {i}", "completion": "negative" if i < 20 else "positive"} for i in range(40)]
    path = write_jsonl(tmp_path / "sorted.jsonl", rows)
    a = generalization.load_task_items([path], tokenizer, DataConfig(), limit=6, seed=0)
    b = generalization.load_task_items([path], tokenizer, DataConfig(), limit=6, seed=0)
    c = generalization.load_task_items([path], tokenizer, DataConfig(), limit=6, seed=1)
    lines = [int(it.where.rsplit(":", 1)[1]) for it in a]
    assert len(a) == 6 and lines == sorted(lines) and [it.where for it in b] == [it.where for it in a]
    assert [it.where for it in c] != [it.where for it in a]
    assert {it.reference for it in a} == {"negative", "positive"}
    assert all(it.example.input_ids == full.example.input_ids for it in a
               for full in generalization.load_task_items([path], tokenizer, DataConfig()) if full.where == it.where)


def test_score_task_rows_accuracy(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"review {i}"},
                          {"role": "assistant", "content": "positive" if i % 2 else "negative"}], "task": "sent"}
            for i in range(4)]
    items = generalization.load_task_items([write_jsonl(tmp_path / "d.jsonl", rows)], tokenizer, DataConfig(task_field="task"))
    labels = generalization.task_label_sets(items)
    assert labels == {"sent": ["negative", "positive"]}
    nlls = [Nll(2.0, 2)] * 4
    gens = ["It is positive.", "positive", "negative", "no idea"]  # references: neg, pos, neg, pos
    scored = generalization.score_task_rows(items, nlls, gens, labels)
    assert [r["correct"] for r in scored] == [0.0, 1.0, 1.0, 0.0]
    assert [r["exact_match"] for r in scored] == [0.0, 1.0, 1.0, 0.0]
    summary = generalization.summarise_tasks(scored, training_tasks=["other"])
    assert summary["tasks"]["sent"]["accuracy"] == 0.5 and summary["tasks"]["sent"]["seen"] is False
    assert summary["macro"]["seen"] is None and summary["macro"]["unseen"]["accuracy"] == 0.5


# ---- NLL scoring --------------------------------------------------------------------------------------------------
def test_nll_matches_plain_transformers(tmp_path, tokenizer, tiny_model):
    """Batched, padded, masked NLL == HF's own loss on each example, with labels built from the chat template."""
    import torch

    from sftlab.evaluate.scoring import example_nll

    convs = [
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a colour of the sky."},
         {"role": "assistant", "content": "Blue, mostly, on a clear day."}],
        [{"role": "user", "content": "Say <|im_end|> please"}, {"role": "assistant", "content": "No thanks, friend."}],
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": m} for m in convs[:2]])
    items = generalization.load_task_items([path], tokenizer, DataConfig())
    nlls = example_nll(tiny_model, [it.example for it in items], tokenizer.pad_token_id, batch_tokens=4096)
    for it, got, msgs in zip(items, nlls, convs):
        prefix = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        response = msgs[-1]["content"] + "<|im_end|>"
        assert full.startswith(prefix + response)
        p_ids = tokenizer(prefix, add_special_tokens=False).input_ids
        r_ids = tokenizer(response, add_special_tokens=False).input_ids
        rest = tokenizer(full[len(prefix + response):], add_special_tokens=False).input_ids
        ids = p_ids + r_ids + rest
        assert it.example.input_ids == ids
        labels = [-100] * len(p_ids) + r_ids + [-100] * len(rest)
        with torch.no_grad():
            ref = tiny_model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
        assert got.tokens == len(r_ids)
        assert got.mean == pytest.approx(ref, rel=1e-5, abs=1e-5)
    # a third example in the same batch does not change the others (padding is masked)
    from sftlab.data.formats import Conversation, Message
    from sftlab.data.pipeline import encode_conversations
    from sftlab.data.template import resolve_template

    extra = [ex for _, ex in encode_conversations([Conversation([Message(m["role"], m["content"]) for m in convs[2]])],
                                                  tokenizer, resolve_template("default", tokenizer),
                                                  DataConfig())]
    both = example_nll(tiny_model, [it.example for it in items] + extra, tokenizer.pad_token_id)
    assert [n.mean for n in both[:2]] == pytest.approx([n.mean for n in nlls], rel=1e-5)
    with torch.no_grad():
        ex = extra[0]
        ref = tiny_model(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels])).loss.item()
    assert both[2].mean == pytest.approx(ref, rel=1e-5)


# ---- end to end -------------------------------------------------------------------------------------------------
@pytest.fixture
def eval_inputs(tmp_path, tokenizer):
    """A run dir (RUN/model + summary.json trained on task `seen`), task data, a QA probe and a text file."""
    run = tmp_path / "run"
    make_tiny_llama().save_pretrained(run / "model")
    tokenizer.save_pretrained(run / "model")
    (run / "summary.json").write_text(json.dumps({"tasks": ["seen"]}))
    rows = [{"messages": [{"role": "user", "content": f"Is {i} even?"},
                          {"role": "assistant", "content": "yes" if i % 2 == 0 else "no"}],
             "task": "seen" if i < 4 else "unseen"} for i in range(8)]
    data = write_jsonl(tmp_path / "tasks.jsonl", rows)
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Capital of France?", "golds": ["Paris", "paris, France"]},
                                             {"q": "2+3?", "golds": "5"}, {"q": "Sky colour?", "golds": ["blue"]}])
    text = tmp_path / "doc.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    return run, data, qa, text


def test_eval_base_vs_itself(eval_inputs, tmp_path, tiny_model_dir):
    """Same weights as base: every delta is exactly 0 and every CI contains 0; the schema is complete."""
    from sftlab.config import EvalConfig
    from sftlab.evaluate.evaluate import evaluate

    run, data, qa, text = eval_inputs
    out = tmp_path / "eval"
    cfg = EvalConfig(data=[str(data)], general=[str(qa)], text=[str(text)], question_field="q", answer_field="golds",
                     few_shot=1, max_new_tokens=3, qa_max_new_tokens=3, bootstrap=200, text_window=32, generations=3)
    m = evaluate(cfg, str(run / "model"), out, DataConfig(task_field="task"), base=str(tiny_model_dir),
                 console=quiet())
    assert m == json.loads((out / "metrics.json").read_text())
    assert set(m) >= {"schema_version", "created", "wall_s", "model", "base", "template", "options", "training_tasks",
                      "data", "results", "deltas", "few_shot", "generations"}
    assert m["training_tasks"] == ["seen"]
    res = m["results"]["model"]
    assert set(res["tasks"]) == {"seen", "unseen"} and res["tasks"]["seen"]["seen"] is True
    assert set(res["tasks"]["seen"]) == {"n", "seen", "nll", "exact_match", "rouge_l", "accuracy", "majority_baseline",
                                         "degenerate"}
    assert set(res["macro"]) == {"all", "seen", "unseen"}
    assert m["data"]["label_sets"] == {"seen": ["no", "yes"], "unseen": ["no", "yes"]}
    assert res["tasks"]["seen"]["majority_baseline"] == 0.5 and not res["tasks"]["seen"]["degenerate"]
    assert res["macro"]["all"]["majority_baseline"] == 0.5 and res["macro"]["all"]["degenerate_tasks"] == 0
    assert m["data"]["answer_warnings"] == []
    qa_res = res["general"]["qa"][str(qa)]
    assert qa_res["n"] == 3 and set(qa_res) == {"n", "gold_nll", "exact_match", "contains", "choice_accuracy",
                                                "few_shot_exact_match", "few_shot_contains", "n_choice", "n_few_shot"}
    assert qa_res["n_few_shot"] == 3  # 3 questions: each shown the other two as its fixed demonstrations
    assert qa_res["choice_accuracy"] is None and qa_res["n_choice"] == 0  # no options in this probe
    txt = res["general"]["text"][str(text)]
    assert txt["perplexity"] == pytest.approx(math.exp(txt["nll"]))
    # identical weights -> identical scores -> zero deltas with zero-width intervals
    assert m["results"]["base"] == res
    entries = []
    for per_task in m["deltas"]["tasks"].values():
        entries += per_task.values()
    for macro in m["deltas"]["macro"].values():
        entries += macro.values()
    for kind in ("qa", "text"):
        for per_file in m["deltas"]["general"][kind].values():
            entries += [v for v in per_file.values() if isinstance(v, dict)]
    assert len(entries) >= 20
    for e in entries:
        assert e["delta"] == 0.0 and e["ci95"][0] <= 0.0 <= e["ci95"][1]
    assert m["deltas"]["general"]["text"][str(text)]["perplexity_ratio"] == 1.0
    # prompting baseline on the task unseen in training, 1 demonstration each
    few = m["few_shot"]
    assert few["k"] == 1 and few["tasks"] == ["unseen"] and few["n"] == 4
    assert few["model_zero_shot"]["tasks"]["unseen"]["nll"] == res["tasks"]["unseen"]["nll"]
    assert few["base_k_shot"]["tasks"]["unseen"]["nll"] != res["tasks"]["unseen"]["nll"]  # the shots are context
    gens = m["generations"]
    assert len(gens) == 3 and [g["task"] for g in gens[:2]] == ["seen", "unseen"]
    assert all(g["base"] == g["model"] for g in gens)
    lines = [json.loads(x) for x in (out / "examples.jsonl").read_text().splitlines()]
    assert sum(r["model"] == "model" and r["kind"] == "task" for r in lines) == 8
    # every row can be read alone: FILE:LINE, the reference (gold answers and question for QA), the generation
    task_rows = [r for r in lines if r["kind"] == "task" and r["model"] == "model"]
    for r in task_rows:
        line = int(r["where"].rsplit(":", 1)[1])
        i = int(json.loads(data.read_text().splitlines()[line - 1])["messages"][0]["content"].split()[1])
        assert r["reference"] == ("yes" if i % 2 == 0 else "no") and "generation" in r
    qa_rows = [r for r in lines if r["kind"] == "qa" and r["model"] == "model"]
    assert [r["question"] for r in qa_rows] == ["Capital of France?", "2+3?", "Sky colour?"]
    assert qa_rows[0]["answers"] == ["Paris", "paris, France"] and qa_rows[1]["answers"] == ["5"]


def test_eval_sets_the_majority_baseline_beside_accuracy_and_warns(tmp_path, tiny_model_dir):
    """A single-label task and an imbalanced one get their majority baseline and a warning; a free-text task none."""
    from sftlab.config import EvalConfig
    from sftlab.evaluate.evaluate import evaluate

    rows = ([{"prompt": f"Review {i}: sentiment?", "completion": "Negative.", "task": "one_label"} for i in range(6)]
            + [{"prompt": f"Topic {i}?", "completion": "sports" if i < 9 else "world", "task": "skewed"}
               for i in range(10)]
            + [{"prompt": f"Story {i}?", "completion": f"a story about {i} dragons", "task": "free"} for i in range(4)])
    data = write_jsonl(tmp_path / "tasks.jsonl", rows)
    con = quiet()
    m = evaluate(EvalConfig(data=[str(data)], max_new_tokens=2, bootstrap=20), str(tiny_model_dir),
                 tmp_path / "eval", DataConfig(task_field="task"), console=con)
    tasks = m["results"]["model"]["tasks"]
    assert tasks["one_label"]["majority_baseline"] == 1.0 and tasks["one_label"]["degenerate"]
    assert tasks["skewed"]["majority_baseline"] == 0.9 and tasks["skewed"]["degenerate"]
    assert tasks["free"]["majority_baseline"] is None and not tasks["free"]["degenerate"]
    assert m["results"]["model"]["macro"]["all"]["degenerate_tasks"] == 2
    assert m["data"]["answer_distributions"]["skewed"]["labels"] == {"sports": 9, "world": 1}
    warnings = m["data"]["answer_warnings"]
    assert len(warnings) == 2 and "'one_label': 6 of 6 references are 'negative' (one answer only)" in warnings[0]
    assert "'skewed': 9 of 10" in warnings[1] and "90%" in warnings[1]
    assert "one answer only" in con.file.getvalue()


def test_eval_gold_nll_is_min_over_golds(eval_inputs, tokenizer, tiny_model):
    from sftlab.data.template import resolve_template
    from sftlab.evaluate import forgetting
    from sftlab.evaluate.scoring import example_nll

    _, _, qa, _ = eval_inputs
    tmpl = resolve_template("default", tokenizer)
    items = forgetting.read_qa([qa], tokenizer, tmpl, "q", "golds")
    assert [len(it.gold) for it in items] == [2, 1, 1]
    flat = example_nll(tiny_model, [ex for it in items for ex in it.gold], tokenizer.pad_token_id)
    got = forgetting.min_gold_nll(items, flat)
    assert got[0] == min(flat[0].mean, flat[1].mean) and got[1] == flat[2].mean
    # the scored tokens are the answer plus <|im_end|>
    assert flat[2].tokens == len(tokenizer("5<|im_end|>", add_special_tokens=False).input_ids)


def test_eval_cli_errors(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from sftlab.cli import app

    bad = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q?", "answer": ["a"]}, {"question": "q2?"}])
    r = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--general", str(bad), "--out",
                                 str(tmp_path / "o")])
    assert r.exit_code == 1
    assert "qa.jsonl:2" in r.output and "'answer'" in r.output
    r = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "nothing to evaluate" in r.output
