"""`sftlab data split`: held-out tasks and instances, disjoint, seeded, read back by the data layer."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from sftlab.data import split as data_split
from sftlab.config import DataConfig
from sftlab.evaluate import generalization


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- splits ---------------------------------------------------------------------------------------------------
@pytest.fixture
def task_files(tmp_path):
    """Three files = three tasks (via a task map with clusters); task `alpha` has a duplicated record."""
    d = tmp_path / "data"
    d.mkdir()
    for stem in ("alpha_t1", "beta_t1", "gamma_t1"):
        rows = [{"prompt": f"{stem} question {i}?", "completion": f"answer {i % 3}"} for i in range(10)]
        if stem == "alpha_t1":
            rows.append(dict(rows[0]))
        write_jsonl(d / f"{stem}.jsonl", rows)
    task_map = tmp_path / "tasks.json"
    task_map.write_text(json.dumps({
        "alpha_t1": {"task": "alpha", "cluster": "qa"}, "beta_t1": {"task": "beta", "cluster": "qa"},
        "gamma_t1": {"task": "gamma", "cluster": "sentiment"}}))
    return d, task_map


def read_split(out):
    return {name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
            for name in data_split.SPLITS}


def key(rec):
    return json.dumps(rec["messages"], sort_keys=True)


def test_split_cluster_disjoint_and_deterministic(task_files, tmp_path):
    d, task_map = task_files
    opts = DataConfig(task_map=str(task_map))
    split = data_split.SplitOptions(holdout_cluster=("sentiment",), instance_fraction=0.3, seed=1)
    summary = data_split.write_split([d], opts, split, tmp_path / "s1", quiet())
    out = read_split(tmp_path / "s1")
    assert {r["task"] for r in out["heldout-tasks"]} == {"gamma"}
    assert {r["task"] for r in out["train"]} == {"alpha", "beta"}
    assert {r["task"] for r in out["heldout-instances"]} <= {"alpha", "beta"}
    # no conversation in two splits (the duplicated alpha record stays on one side)
    keys = {name: {key(r) for r in rows} for name, rows in out.items()}
    assert not keys["train"] & keys["heldout-instances"]
    assert not keys["train"] & keys["heldout-tasks"]
    assert sum(len(v) for v in out.values()) == 31
    # 30 % of each remaining task's 10 distinct conversations
    assert summary["per_task"]["alpha"]["heldout-instances"] == 3
    assert summary["per_task"]["beta"]["heldout-instances"] == 3
    assert summary["heldout_tasks"] == ["gamma"] and summary["clusters"]["gamma"] == "sentiment"
    assert json.loads((tmp_path / "s1" / "split.json").read_text())["counts"] == summary["counts"]
    # same seed -> same files; other seed -> other held-out instances
    data_split.write_split([d], opts, split, tmp_path / "s2", quiet())
    assert read_split(tmp_path / "s2") == out
    data_split.write_split([d], opts, data_split.SplitOptions(holdout_cluster=("sentiment",), instance_fraction=0.3, seed=2),
                   tmp_path / "s3", quiet())
    assert {key(r) for r in read_split(tmp_path / "s3")["heldout-instances"]} != keys["heldout-instances"]


def test_split_named_and_fraction_and_read_back(task_files, tmp_path, tokenizer):
    d, task_map = task_files
    opts = DataConfig(task_map=str(task_map))
    data_split.write_split([d], opts, data_split.SplitOptions(holdout=("beta",), instance_fraction=0.0), tmp_path / "n", quiet())
    out = read_split(tmp_path / "n")
    assert {r["task"] for r in out["heldout-tasks"]} == {"beta"} and out["heldout-instances"] == []
    s = data_split.write_split([d], opts, data_split.SplitOptions(holdout_fraction=0.34, seed=0), tmp_path / "f", quiet())
    assert len(s["heldout_tasks"]) == 1 and s["heldout_tasks"][0] not in s["train_tasks"]
    # the written files read back through the data layer with their task labels
    items = generalization.load_task_items([tmp_path / "n" / "heldout-tasks.jsonl"], tokenizer, DataConfig(task_field="task"))
    assert {it.task for it in items} == {"beta"} and len(items) == 10


def test_split_errors(task_files, tmp_path):
    d, task_map = task_files
    with pytest.raises(ValueError, match="no such task"):
        data_split.write_split([d], DataConfig(task_map=str(task_map)), data_split.SplitOptions(holdout=("delta",)),
                       tmp_path / "e", quiet())
    with pytest.raises(ValueError, match="needs a --task-map"):
        data_split.write_split([d], DataConfig(), data_split.SplitOptions(holdout_cluster=("qa",)), tmp_path / "e", quiet())
    with pytest.raises(ValueError, match="every task would be held out"):
        data_split.write_split([d], DataConfig(task_map=str(task_map)),
                       data_split.SplitOptions(holdout_cluster=("qa", "sentiment")), tmp_path / "e", quiet())


def test_split_cli(task_files, tmp_path):
    from typer.testing import CliRunner

    from sftlab.cli import app

    d, task_map = task_files
    args = ["data", "split", str(d), "--task-map", str(task_map), "--out", str(tmp_path / "c")]
    r = CliRunner().invoke(app, args + ["--holdout", "alpha,gamma", "--instance-fraction", "0.2", "--seed", "5"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c" / "split.json").read_text())["heldout_tasks"] == ["alpha", "gamma"]
    assert "train 8, heldout-instances 2, heldout-tasks 21" in r.output.replace("\n", " ")
    r = CliRunner().invoke(app, args + ["--holdout-cluster", "nope"])
    assert r.exit_code == 1 and "--holdout-cluster nope" in r.output
