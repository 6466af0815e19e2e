"""`sftlab run`: every stage's output in one run directory, skipping complete stages, redoing interrupted or
changed ones, CLI errors; the demo's scores read from a complete run."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import make_tiny_llama
from sftlab.cli import app
from sftlab.config import load_config
from sftlab.demo_data import HELDOUT_TASKS, TRAIN_TASKS, write_demo_data
from sftlab.evaluate.evaluate import key_numbers
from sftlab.runner import STAGES, plan, read_log, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("audit/tasks.json", "audit/examples.jsonl", "audit/embeddings.npy", "select/train.jsonl",
           "select/train.summary.json", "train/summary.json", "train/model/model.safetensors", "eval/metrics.json",
           "report.html")


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def printed(console: Console) -> str:
    return console.file.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer):
    """A saved tiny model, small demo splits and a 3-question QA probe."""
    root = tmp_path_factory.mktemp("inputs")
    model_dir = root / "tiny"
    make_tiny_llama().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = write_demo_data(root / "data", n_train=4, n_heldout=2, n_heldout_task=2)
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in [{"question": "Capital of France?", "answer": ["Paris"]},
                                                          {"question": "2+3?", "answer": "5"},
                                                          {"question": "Sky colour?", "answer": ["blue"]}]))
    return model_dir, data, qa


def make_cfg(inputs, run_dir: Path, *extra: str):
    model_dir, data, qa = inputs
    j = json.dumps
    return load_config(None, [
        f"output_dir={j(str(run_dir))}", f"model.path={j(str(model_dir))}", f"data.train={j([str(data['train'])])}",
        "data.task_field=task", "data.max_length=128",
        "train.batch_size=8", "train.lr=1e-3", "train.warmup_ratio=0", "train.save_every=1", "train.keep_last=2",
        "audit.limit_per_task=3", "select.strategy=task-balanced", "select.budget=24",
        f"eval.data={j([str(data['heldout_instances']), str(data['heldout_tasks'])])}", f"eval.general={j([str(qa)])}",
        "eval.max_new_tokens=3", "eval.qa_max_new_tokens=3", "eval.bootstrap=50", "eval.generations=4", *extra])


@pytest.fixture(scope="module")
def done(inputs, tmp_path_factory):
    """One complete run (every stage), made once; tests work on copies."""
    run = tmp_path_factory.mktemp("runs") / "run"
    con = quiet()
    run_pipeline(make_cfg(inputs, run), con)
    return run, printed(con)


@pytest.fixture
def copy(done, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(done[0], run)
    return run


def ids(run: Path) -> dict[str, str]:
    return {k: v.get("id") for k, v in read_log(run)["stages"].items()}


def mtimes(run: Path) -> dict[str, int]:
    return {p: (run / p).stat().st_mtime_ns for p in OUTPUTS}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- a whole run ----------------------------------------------------------------------------------------------------
def test_run_writes_every_stage(inputs, done):
    run, out = done
    model_dir, data, qa = inputs
    for p in OUTPUTS:
        assert (run / p).is_file(), p
    log = read_log(run)
    assert list(log["stages"]) == list(STAGES)
    assert all(e["status"] == "complete" and e["id"] for e in log["stages"].values())
    assert log["stages"]["eval"]["needs"] == {"train": log["stages"]["train"]["id"]}
    assert load_config(run / "config.yaml").select.strategy == "task-balanced"
    # audit: 3 sampled examples of each of the 12 training families
    audit = rows(run / "audit" / "examples.jsonl")
    assert Counter(r["task"] for r in audit) == {t: 3 for t in TRAIN_TASKS}
    # select: task-balanced budget 24 over 12 families -> 2 each; training used exactly that file
    chosen = rows(run / "select" / "train.jsonl")
    assert Counter(r["task"] for r in chosen) == {t: 2 for t in TRAIN_TASKS}
    summary = json.loads((run / "train" / "summary.json").read_text())
    assert summary["train_examples"] == 24 and summary["steps"] == 3 and summary["tasks"] == sorted(TRAIN_TASKS)
    assert load_config(run / "train" / "config.yaml").data.train == [str(run / "select" / "train.jsonl")]
    # eval: tuned (RUN/train/model) vs base (model.path), seen = training families, QA probe
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["model"] == str(run / "train" / "model") and m["base"] == str(model_dir)
    assert m["training_tasks"] == sorted(TRAIN_TASKS)
    tasks = m["results"]["model"]["tasks"]
    assert {t: v["seen"] for t, v in tasks.items()} == {t: t not in HELDOUT_TASKS for t in list(TRAIN_TASKS) + list(HELDOUT_TASKS)}
    assert m["results"]["model"]["general"]["qa"][str(qa)]["n"] == 3
    assert log["stages"]["eval"]["result"] == key_numbers(m)
    assert log["stages"]["train"]["result"]["steps"] == 3
    # report: this run's audit, loss curve (from RUN/train) and eval
    page = (run / "report.html").read_text()
    assert "No training log" not in page and "No audit found" not in page and "No task evaluation" not in page
    # one rule per stage and the summary line
    for i, name in enumerate(STAGES, start=1):
        assert f"{i}/5 {name}" in out
    last = [line for line in out.splitlines() if line.startswith("done audited")][-1]  # the one-line summary
    assert last.startswith("done audited 36 examples, 12 tasks: ") and "; selected 24 of 36 (task-balanced); " \
        "trained 3 steps, loss " in last and f"({run / 'train' / 'model'})" in last and "; eval (base -> tuned): " \
        "seen tasks EM " in last and f"report {run / 'report.html'}" in last


def test_rerun_skips_complete_stages(inputs, copy):
    before_ids, before_mtimes = ids(copy), mtimes(copy)
    con = quiet()
    run_pipeline(make_cfg(inputs, copy), con)
    assert ids(copy) == before_ids and mtimes(copy) == before_mtimes
    assert printed(con).count("complete, skipped") == len(STAGES)


def test_interrupted_stage_is_redone(inputs, copy):
    """A stage killed midway is left 'running' (its outputs are written atomically, so none exist)."""
    log = read_log(copy)
    log["stages"]["eval"]["status"] = "running"
    (copy / "run.json").write_text(json.dumps(log))
    shutil.rmtree(copy / "eval")
    before = ids(copy)
    run_pipeline(make_cfg(inputs, copy), quiet())
    after = ids(copy)
    assert {k: after[k] for k in ("audit", "select", "train")} == {k: before[k] for k in ("audit", "select", "train")}
    assert after["eval"] != before["eval"] and after["report"] != before["report"]  # report: its input changed
    assert (copy / "eval" / "metrics.json").is_file()
    assert read_log(copy)["stages"]["report"]["needs"]["eval"] == after["eval"]


def test_failing_stage_stays_incomplete_and_reruns(inputs, copy, tmp_path):
    """A stage that raises is left 'running' and nothing after it runs; fixed, the rerun redoes it only."""
    before = ids(copy)
    with pytest.raises(FileNotFoundError):
        run_pipeline(make_cfg(inputs, copy, f"eval.general={json.dumps([str(tmp_path / 'missing.jsonl')])}"), quiet())
    log = read_log(copy)
    assert log["stages"]["eval"]["status"] == "running" and "id" not in log["stages"]["eval"]
    assert not (copy / "eval").exists()  # discarded before the retry: its settings had changed
    assert log["stages"]["report"]["id"] == before["report"]  # not reached
    run_pipeline(make_cfg(inputs, copy), quiet())
    after = ids(copy)
    assert after["train"] == before["train"] and after["eval"] != before["eval"]
    assert read_log(copy)["stages"]["eval"]["status"] == "complete"


def test_training_resumes_from_its_last_checkpoint(inputs, copy, done):
    """Killed after step 3 was logged but before its checkpoint: training continues from step 2, bit-exactly."""
    weights = load_file(str(done[0] / "train" / "model" / "model.safetensors"))
    log = read_log(copy)
    log["stages"]["train"]["status"] = "running"
    (copy / "run.json").write_text(json.dumps(log))
    ckpts = copy / "train" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000003"]
    shutil.rmtree(ckpts / "step-00000003")
    shutil.rmtree(copy / "train" / "model")
    (copy / "train" / "summary.json").unlink()
    run_pipeline(make_cfg(inputs, copy), quiet())
    steps = [r["step"] for r in rows(copy / "train" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3]  # resumed from step 2: the log is cut back to that checkpoint, step 3 logged once
    for k, v in load_file(str(copy / "train" / "model" / "model.safetensors")).items():
        torch.testing.assert_close(v, weights[k], atol=0, rtol=0)
    assert read_log(copy)["stages"]["eval"]["needs"]["train"] == ids(copy)["train"]


def test_changed_settings(inputs, copy):
    before = ids(copy)
    # eval settings: eval is redone by itself, training is kept
    run_pipeline(make_cfg(inputs, copy, "eval.limit=2"), quiet())
    after = ids(copy)
    assert after["train"] == before["train"] and after["eval"] != before["eval"]
    m = json.loads((copy / "eval" / "metrics.json").read_text())
    assert m["data"]["examples"] == 4 and m["options"]["limit"] == 2
    # training settings: an error before anything runs, naming the key and the way out
    log = (copy / "run.json").read_text()
    with pytest.raises(ValueError, match=r"train stage .*train\.lr.*--from train"):
        run_pipeline(make_cfg(inputs, copy, "eval.limit=2", "train.lr=5e-4"), quiet())
    assert (copy / "run.json").read_text() == log
    # select settings change the training data: same
    with pytest.raises(ValueError, match=r"train stage .*input \(select\)"):
        run_pipeline(make_cfg(inputs, copy, "eval.limit=2", "select.budget=12"), quiet())
    # --only report redoes the report alone
    run_pipeline(make_cfg(inputs, copy, "eval.limit=2"), quiet(), only="report")
    again = ids(copy)
    assert again["report"] != after["report"] and {k: again[k] for k in STAGES[:4]} == {k: after[k] for k in STAGES[:4]}


def test_from_and_only_errors(inputs, tmp_path):
    cfg = make_cfg(inputs, tmp_path / "fresh")
    with pytest.raises(ValueError, match="--only eval: its input stage train is not complete"):
        run_pipeline(cfg, quiet(), only="eval")
    with pytest.raises(ValueError, match="--from selct: is not a stage"):
        run_pipeline(cfg, quiet(), from_stage="selct")
    with pytest.raises(ValueError, match="--from select: is off"):
        run_pipeline(make_cfg(inputs, tmp_path / "fresh", "select.strategy=null"), quiet(), from_stage="select")
    with pytest.raises(ValueError, match="audit.enabled=true"):
        run_pipeline(make_cfg(inputs, tmp_path / "fresh", "audit.enabled=false"), quiet())
    with pytest.raises(ValueError, match="audit.generate=true"):
        run_pipeline(make_cfg(inputs, tmp_path / "fresh", "select.strategy=self-rehearsal", "audit.generate=false"),
                     quiet())
    assert not (tmp_path / "fresh").exists()


# ---- CLI and example config -------------------------------------------------------------------------------------------------
def test_cli_run_errors_and_help(tmp_path):
    r = CliRunner().invoke(app, ["run", "data.train=[x.jsonl]", f"output_dir={tmp_path / 'r'}", "eval.limt=3"])
    assert r.exit_code == 1 and "did you mean 'eval.limit'" in r.output
    r = CliRunner().invoke(app, ["run", "data.train=[x.jsonl]", f"output_dir={tmp_path / 'r'}", "--only", "report"])
    assert r.exit_code == 1 and "--only report: its input stage audit, train is not complete" in r.output
    r = CliRunner().invoke(app, ["run", "--help-config"])
    assert r.exit_code == 0
    keys = {line.split()[0] for line in r.output.splitlines() if line.strip()}
    assert {"audit.enabled", "audit.limit_per_task", "select.strategy", "select.budget", "eval.data", "eval.general",
            "eval.max_new_tokens", "report", "train.lr"} <= keys


def test_example_t0_config_loads(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config("configs/run-t0.yaml")
    assert [s.name for s in plan(cfg)] == ["audit", "train", "eval", "report"]
    paths = cfg.data.train + cfg.eval.data + cfg.eval.general + [cfg.data.task_map]
    missing = [p for p in paths if not Path(p).is_file()]
    assert not missing
    tasks = json.loads(Path(cfg.data.task_map).read_text())
    trained = {tasks[Path(p).stem]["task"] for p in cfg.data.train}
    evaluated = {tasks[Path(p).stem]["task"] for p in cfg.eval.data}
    assert evaluated & trained and evaluated - trained  # seen tasks in new phrasings, and held-out tasks
    from sftlab.data.answers import answer_distribution, degenerate

    for p in cfg.eval.data:  # no evaluated task whose accuracy only measures its majority answer
        refs = [json.loads(line)["completion"].replace("<|endoftext|>", "") for line in open(p, encoding="utf-8")]
        assert not degenerate(answer_distribution(refs)), p


# ---- the demo on a complete run -------------------------------------------------------------------------------------------------------
def test_demo_scores_from_eval(done):
    from sftlab.demo import demo_generations, demo_scores

    run = done[0]
    m = json.loads((run / "eval" / "metrics.json").read_text())
    scores = demo_scores(m)
    hits = defaultdict(list)  # independently: mean exact match per (model, family) from the example rows
    for r in rows(run / "eval" / "examples.jsonl"):
        if r["kind"] == "task":
            hits[r["model"], r["task"]].append(r["exact_match"])
    for label, role in (("before", "base"), ("after", "model")):
        s = scores[label]
        assert set(s["heldout_tasks"]["families"]) == set(HELDOUT_TASKS)
        assert set(s["heldout_instances"]["families"]) == set(TRAIN_TASKS)
        for split in s.values():
            for fam, v in split["families"].items():
                assert v == pytest.approx(sum(hits[role, fam]) / len(hits[role, fam]))
            assert split["mean"] == pytest.approx(sum(split["families"].values()) / len(split["families"]))
    gens = demo_generations(m, 6)
    assert len(gens) <= 6 and all(g["base"] is not None and g["model"] is not None for g in gens)
