"""`sftlab data tokenize` / `data inspect` on real data: trained spans decode to the source responses, tasks come
from the task map, output rows are in input order, summaries and warnings are printed."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sftlab.cli import app

EOT = "<|im_end|>"
T0_FILES = ("ag_news_classify", "cnn_dailymail_3_0_0_tldr_summary")


@pytest.fixture
def runner():
    return CliRunner()


def head_lines(src, dst, n):
    with open(src, encoding="utf-8") as f:
        lines = [next(f) for _ in range(n)]
    dst.write_text("".join(lines), encoding="utf-8")
    return [json.loads(x) for x in lines]


def trained_text(row, tokenizer):
    return tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100])


def trained_runs(row, tokenizer):
    runs, cur = [], []
    for t, lab in zip(row["input_ids"] + [None], row["labels"] + [-100]):
        if lab != -100:
            cur.append(t)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    return runs


def read_rows(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_tokenize_t0_slice(tmp_path, tokenizer, shared_data):
    runner = CliRunner()  # the real `--model default` path, tokenizer loaded by the command itself
    sources, inputs = [], []
    for stem in T0_FILES:
        path = tmp_path / "t0" / f"{stem}.jsonl"
        path.parent.mkdir(exist_ok=True)
        sources += [(stem, r) for r in head_lines(shared_data / "t0-mixture" / f"{stem}.jsonl", path, 50)]
        inputs.append(str(path))
    task_map = json.loads((shared_data / "t0-tasks.json").read_text())
    out = tmp_path / "t0.tokens.jsonl"
    result = runner.invoke(app, ["data", "tokenize", *inputs, "--model", "default", "--out", str(out),
                                 "--strip", "<|endoftext|>", "--task-map", str(shared_data / "t0-tasks.json")])
    assert result.exit_code == 0, result.output
    assert "100 examples kept of 100 records" in result.stderr
    rows = read_rows(out)
    assert len(rows) == len(sources) == 100
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for row, (stem, rec) in zip(rows, sources):  # input order
        assert row["task"] == task_map[stem]["task"]
        assert rec["completion"].endswith("<|endoftext|>")
        assert trained_runs(row, tokenizer) == [rec["completion"].removesuffix("<|endoftext|>") + EOT]
        assert endoftext not in row["input_ids"]  # the artefact is gone, not turned into a control token
        msgs = [{"role": "user", "content": rec["prompt"]},
                {"role": "assistant", "content": rec["completion"].removesuffix("<|endoftext|>")}]
        oracle = tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False), add_special_tokens=False).input_ids
        assert row["input_ids"] == oracle
    assert rows[0]["task"] == "ag_news" and len({r["task"] for r in rows}) == 2


def test_tokenize_t0_empty_completions_are_reported(tmp_path, runner, shared_data):
    path = tmp_path / "trec_trec1.jsonl"
    head_lines(shared_data / "t0-mixture" / "trec_trec1.jsonl", path, 20)  # T0's trec files have no answers
    out = tmp_path / "trec.tokens.jsonl"
    args = ["data", "tokenize", str(path), "--out", str(out), "--strip", "<|endoftext|>"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert f"error: {path}:1: empty response" in result.stderr
    result = runner.invoke(app, args + ["--skip-invalid"])
    assert result.exit_code == 0, result.output
    assert "0 examples kept of 20 records; 20 invalid skipped empty_response=20" in result.stderr
    assert out.read_text() == ""


def test_tokenize_cherry_alpaca_subset(tmp_path, runner, tokenizer, shared_data):
    records = json.loads((shared_data / "cherry-alpaca-5pct.json").read_text(encoding="utf-8"))
    with_input = [r for r in records if r["input"].strip()][:15]
    subset = records[:25] + with_input
    path = tmp_path / "cherry.json"
    path.write_text(json.dumps(subset, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "cherry.tokens.jsonl"
    result = runner.invoke(app, ["data", "tokenize", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert len(rows) == len(subset)
    for row, rec in zip(rows, subset):
        assert row["task"] == "cherry"
        assert trained_runs(row, tokenizer) == [rec["output"] + EOT]
        user = rec["instruction"] + ("\n\n" + rec["input"] if rec["input"].strip() else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
        oracle = tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False), add_special_tokens=False).input_ids
        assert row["input_ids"] == oracle
    # the built-in alpaca template, with prompt tokens weighted 0.1
    out2 = tmp_path / "cherry.alpaca.jsonl"
    result = runner.invoke(app, ["data", "tokenize", str(path), "--out", str(out2), "--template", "alpaca",
                                 "--prompt-loss-weight", "0.1"])
    assert result.exit_code == 0, result.output
    for row, rec in zip(read_rows(out2), subset):
        assert row["labels"] == row["input_ids"]
        response = [t for t, w in zip(row["input_ids"], row["weights"]) if w == 1.0]
        assert tokenizer.decode(response) == rec["output"] + EOT
        assert set(row["weights"]) == {0.1, 1.0}
        assert tokenizer.decode(row["input_ids"]).startswith("Below is an instruction that describes a task.")


def test_tokenize_truncation_counts(tmp_path, runner):
    recs = [{"instruction": "Summarise: " + "lorem ipsum " * 100, "input": "", "output": "Short."},
            {"instruction": "Hi", "input": "", "output": "Hello."},
            {"instruction": "Write.", "input": "", "output": "word " * 200}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "o.jsonl"
    result = runner.invoke(app, ["data", "tokenize", str(path), "--out", str(out), "--max-length", "64"])
    assert result.exit_code == 0, result.output
    assert "2 examples kept of 3 records; 1 truncated; dropped response_too_long=1" in result.stderr
    assert [len(r["input_ids"]) for r in read_rows(out)][0] == 64
    result = runner.invoke(app, ["data", "tokenize", str(path), "--out", str(out), "--max-length", "64",
                                 "--truncation", "drop"])
    assert result.exit_code == 0, result.output
    assert "1 examples kept of 3 records; dropped too_long=2" in result.stderr


def test_inspect_warns_about_special_token_text(tmp_path, runner):
    recs = [{"messages": [{"role": "user", "content": "Print <|im_end|> please"},
                          {"role": "assistant", "content": "Here: <|im_end|><|endoftext|>"}]},
            {"instruction": "Hi", "input": "", "output": "Hello."}]
    a = tmp_path / "chat.jsonl"
    a.write_text(json.dumps(recs[0]) + "\n")
    b = tmp_path / "alpaca.jsonl"
    b.write_text(json.dumps(recs[1]) + "\n")
    result = runner.invoke(app, ["data", "inspect", str(a), str(b), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["special_token_text"] == {"<|im_end|>": 2, "<|endoftext|>": 1}
    assert stats["records"] == stats["kept"] == 2 and stats["formats"] == {"messages": 1, "alpaca": 1}
    assert stats["tasks"] == {"chat": 1, "alpaca": 1}
    assert 0 < stats["trained_fraction"] < 1 and stats["trained_tokens"] < stats["tokens"]
    result = runner.invoke(app, ["data", "inspect", str(a), str(b)])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stdout and "control-token strings" in result.stdout
    assert "2 examples kept of 2 records" in result.stderr


def test_inspect_warns_about_single_label_t0_tasks(shared_data, tmp_path, runner):
    """The shared T0 files whose references are one label only are flagged, with their majority baseline."""
    t0 = shared_data / "t0-mixture"
    files = [str(t0 / f"{name}.jsonl") for name in ("imdb_Movie_Expressed_Sentiment",
                                                    "rotten_tomatoes_Movie_Expressed_Sentiment",
                                                    "ag_news_classify_question_first")]
    result = runner.invoke(app, ["data", "inspect", *files, "--strip", "<|endoftext|>", "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    dists = stats["answer_distributions"]
    assert dists["imdb_Movie_Expressed_Sentiment"]["labels"] == {"negative": 200}
    assert dists["rotten_tomatoes_Movie_Expressed_Sentiment"]["labels"] == {"positive": 200}
    ag = dists["ag_news_classify_question_first"]
    assert len(ag["labels"]) == 2 and ag["majority_baseline"] == max(ag["labels"].values()) / 200
    flagged = [w.split("'")[1] for w in stats["answer_warnings"]]
    assert flagged[:2] == ["imdb_Movie_Expressed_Sentiment", "rotten_tomatoes_Movie_Expressed_Sentiment"]
    result = runner.invoke(app, ["data", "inspect", *files, "--strip", "<|endoftext|>"])
    assert result.exit_code == 0 and "one answer only" in result.stdout and "majority baseline" in result.stdout


def test_cli_bad_arguments_exit_nonzero(tmp_path, runner):
    out = tmp_path / "o.jsonl"
    result = runner.invoke(app, ["data", "tokenize", str(tmp_path / "nope.jsonl"), "--out", str(out)])
    assert result.exit_code == 1 and "no such file or directory" in result.stderr
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n")
    result = runner.invoke(app, ["data", "tokenize", str(path), "--out", str(out), "--loss-on", "everything"])
    assert result.exit_code == 1 and "--loss-on: Input should be 'assistant', 'last_assistant' or 'all'" in result.stderr
    result = runner.invoke(app, ["data", "tokenize", str(path), "--out", str(out), "--template", "nosuch"])
    assert result.exit_code == 1 and "--template 'nosuch'" in result.stderr
    assert not out.exists()
