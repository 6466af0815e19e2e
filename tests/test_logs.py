"""Logs a batch job can read: without a terminal, long steps print a plain progress line every
SFTLAB_LOG_EVERY seconds (never a bar's control codes), and tables keep their natural width."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from rich.console import Console

from sftlab.io import NATURAL_WIDTH, PlainProgress, progress, table_console


def test_progress_without_a_terminal_prints_plain_lines(monkeypatch):
    monkeypatch.setenv("SFTLAB_LOG_EVERY", "0")
    c = Console(file=io.StringIO())
    with progress("train", c) as p:
        assert isinstance(p, PlainProgress)
        t = p.add_task("train", total=4, info="")
        for i in range(4):
            p.update(t, advance=1, info=f"loss {2.0 - i / 4:.4f}")
    lines = c.file.getvalue().splitlines()
    assert lines[0].startswith("train: 1/4 (25%) loss 2.0000, elapsed 0:00:00, ETA ")
    assert lines[-1] == "train: 4/4 (100%) loss 1.2500, elapsed 0:00:00"  # the last line: no ETA left
    assert "\x1b" not in c.file.getvalue()


def test_plain_progress_is_rate_limited_and_always_reports_completion():
    c = Console(file=io.StringIO())
    p = PlainProgress("read", c, unit="records", every=3600)
    t = p.add_task("read", total=1000)
    for _ in range(1000):
        p.advance(t)
    assert c.file.getvalue().splitlines() == ["read: 1,000/1,000 (100%) records, elapsed 0:00:00"]
    p.advance(t)  # past its total: said once already
    assert len(c.file.getvalue().splitlines()) == 1


def test_a_terminal_keeps_the_bar():
    c = Console(file=io.StringIO(), force_terminal=True)
    assert not isinstance(progress("x", c), PlainProgress)
    assert not isinstance(progress("x", Console(file=io.StringIO()), disable=True), PlainProgress)


def test_tables_keep_their_natural_width_when_redirected(tmp_path, shared_data):
    """`sftlab data inspect` of T0 files into a pipe: long task names and warnings are not cut at 80 columns."""
    t0 = shared_data / "t0-mixture"
    files = [str(t0 / f"{n}.jsonl") for n in ("imdb_Movie_Expressed_Sentiment",
                                              "dbpedia_14_given_a_list_of_category_what_does_the_title_belong_to")]
    env = {**os.environ, "SFTLAB_LOG_EVERY": "0", "COLUMNS": ""}
    r = subprocess.run([sys.executable, "-m", "sftlab", "data", "inspect", *files, "--strip", "<|endoftext|>"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "dbpedia_14_given_a_list_of_category_what_does_the_title_belong_to" in r.stdout  # whole, not "dbpedia…"
    assert "…" not in r.stdout and max(map(len, r.stdout.splitlines())) > 80
    assert "inspect: 400/400 (100%) records" in r.stderr and "\x1b[" not in r.stderr  # a plain progress line
    assert table_console().width == NATURAL_WIDTH  # pytest's stdout is not a terminal


def test_training_log_redirected_to_a_file(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Say {w}.", "completion": f" {w}"} for w in "a b c d e f g h".split() * 2]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = tmp_path / "job.log"
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "sftlab", "train", f"output_dir={tmp_path / 'out'}",
                            f"model.path={tiny_model_dir}", f"data.train=[{data}]", "train.max_steps=3",
                            "train.batch_size=4", "model.attn_implementation=eager"],
                           stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "SFTLAB_LOG_EVERY": "0"},
                           timeout=300)
    text = log.read_text()
    assert r.returncode == 0, text
    steps = [line for line in text.splitlines() if line.startswith("train: ")]
    assert [s.split()[1] for s in steps] == ["1/3", "2/3", "3/3"] and "trained tok/s" in steps[0]
    assert "ETA" in steps[0] and "\x1b[" not in text
