"""`sftlab demo`: its built-in config and the whole cycle on a tiny model."""

from __future__ import annotations

import io
import os

from rich.console import Console

from sftlab.demo_data import HELDOUT_TASKS, TRAIN_TASKS


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def printed(console: Console) -> str:
    return console.file.getvalue()


def test_demo_config(tmp_path):
    from sftlab.demo import demo_config

    data = {s: tmp_path / f"{s}.jsonl" for s in ("train", "heldout_instances", "heldout_tasks", "general")}
    cfg = demo_config(tmp_path / "my demo: 1", data, "default", ["train.epochs=2"])
    assert cfg.output_dir == str(tmp_path / "my demo: 1") and cfg.train.epochs == 2
    assert cfg.eval.data == [str(data["heldout_instances"]), str(data["heldout_tasks"])]
    assert cfg.eval.base is None and cfg.eval.max_new_tokens == 16
    assert cfg.eval.general == [str(data["general"])]  # forgetting, measured with the embedded probe
    assert cfg.audit.enabled and not cfg.audit.generate and cfg.audit.few_shot == 0 and cfg.audit.limit_per_task
    assert cfg.train.precision == "bf16-master" and cfg.audit.dtype == "bf16"
    slow_bf16 = demo_config(tmp_path, data, "default", [], bf16=False)  # a CPU without native bf16
    assert slow_bf16.train.precision == "fp32" and slow_bf16.audit.dtype == "fp32"


def test_demo_end_to_end_tiny(tiny_model_dir, tmp_path):
    from sftlab.demo import run_demo

    con = quiet()
    # fp32: accelerate keeps the first mixed-precision setting of the process (other tests train in fp32)
    res = run_demo(tmp_path / "demo", str(tiny_model_dir), ["train.max_steps=2", "train.precision=fp32", "data.validation=[]",
                                                       "audit.limit_per_task=1", "eval.limit=6",
                                                       "eval.max_new_tokens=2", "eval.bootstrap=20"], con)
    out = printed(con)
    assert "done demo in" in out and "held-out instances" in out and "trained 2 steps" in out
    assert set(res["after"]["heldout_tasks"]["families"]) <= set(HELDOUT_TASKS)
    assert set(res["after"]["heldout_instances"]["families"]) <= set(TRAIN_TASKS)
    assert (tmp_path / "demo" / "report.html").is_file() and (tmp_path / "demo" / "data" / "train.jsonl").is_file()
    assert all(e["status"] == "complete" for e in res["stages"].values())
    # what it forgot: the embedded general-knowledge probe, ranked by options, before and after
    assert res["general"]["n"] == 6 and 0 <= res["general"]["before"] <= 1 and 0 <= res["general"]["after"] <= 1
    assert "general knowledge (choice accuracy, 6 questions)" in out
    page = (tmp_path / "demo" / "report.html").read_text()
    assert "choice_accuracy" in page and "No general-knowledge probe" not in page
    glance = page.split("<section id='headline'>")[1].split("</section>")[0]  # the report opens with the headline
    assert page.index("<section id='headline'>") < page.index("<section id='overview'>")
    assert "Learned on seen tasks" in glance and "Generalised to unseen tasks" in glance
    assert "Forgot?</b> general.jsonl, choice accuracy" in glance and "verdict-" in glance  # audit verdicts
    from test_report import chromium, console_messages, run_chromium

    if chromium() is None:
        assert os.environ.get("CI") != "true", "CI=true but chromium is missing: .ci/run installs it"
        return
    dom = run_chromium(tmp_path, "--dump-dom", (tmp_path / "demo" / "report.html").resolve().as_uri())
    assert dom.returncode == 0 and console_messages(dom.stderr) == []
    for sid in ("headline", "forgetting"):  # rendered, and not the "nothing found" note
        section = dom.stdout.split(f'<section id="{sid}">')[1].split("</section>")[0]
        assert "<table>" in section and "No general-knowledge probe" not in section, sid
