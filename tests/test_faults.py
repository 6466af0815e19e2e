"""Faults a cluster job meets, on a tiny training run in real subprocesses: kill -9 at random points, SIGTERM,
a disk that refuses the checkpoint, a truncated newest checkpoint, two runs on one directory, a finished run
started again. After each, the resumed run ends with weights bit-equal to an uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sftlab.train.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24
EXIT_INTERRUPTED = 75

pytestmark = pytest.mark.slow


def write_data(path: Path, n: int = 64) -> Path:
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "orbit"]
    with open(path, "w") as f:
        for _ in range(n):
            w = rng.sample(words, rng.randint(1, 5))
            f.write(json.dumps({"messages": [{"role": "user", "content": "Upper case: " + " ".join(w)},
                                             {"role": "assistant", "content": " ".join(x.upper() for x in w)}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model, data, common arguments and the uninterrupted reference run (made once)."""
    from conftest import make_tiny_llama
    from sftlab.models import load_tokenizer

    root = tmp_path_factory.mktemp("faults")
    model_dir = root / "tiny"
    make_tiny_llama().save_pretrained(model_dir)
    load_tokenizer("default").save_pretrained(model_dir)
    data = write_data(root / "train.jsonl")
    common = [f"model.path={model_dir}", f"data.train=[{data}]", "data.max_length=64", "train.lr=1e-3",
              "train.batch_size=4", f"train.max_steps={STEPS}", "train.save_every=3", "train.keep_last=2",
              "train.seed=1", "model.attn_implementation=eager"]
    ref = root / "ref"
    proc = cli(["train", f"output_dir={ref}", *common])
    out = flat(proc.communicate(timeout=600)[0])
    assert proc.returncode == 0, out
    return root, common, weights(ref), metrics_steps(ref)


def cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "sftlab", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def flat(text: str) -> str:
    """Console output with its line wrapping undone."""
    return " ".join(text.split())


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def metrics_steps(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, open(run / "metrics.jsonl")) if "loss" in r]


def train_to_end(run: Path, common: list[str], *extra: str) -> str:
    """`sftlab train` into `run` until it ends; it must succeed. Returns its output, unwrapped."""
    proc = cli(["train", f"output_dir={run}", *extra, *common])
    out = flat(proc.communicate(timeout=600)[0])
    assert proc.returncode == 0, out
    return out


def started(run: Path, common: list[str], until: str) -> subprocess.Popen:
    """`sftlab train` into `run`, returned once `run/until` exists (the run is alive and that far)."""
    proc = cli(["train", f"output_dir={run}", *common])
    wait_for(run / until, proc)
    return proc


def assert_same_run(run: Path, ref_weights: dict, ref_steps: list[int]) -> None:
    got = weights(run)
    assert got.keys() == ref_weights.keys()
    for k in got:
        assert torch.equal(got[k], ref_weights[k]), k
    assert metrics_steps(run) == ref_steps  # every step logged once, in order


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def test_kill9_at_random_points_then_resume_is_bit_exact(setup):
    root, common, ref_w, ref_steps = setup
    run = root / "killed"
    rng = random.Random(1234)
    kills = 0
    while kills < 10:
        proc = started(run, common, "config.yaml")  # setup done: data read, model loaded, training about to start
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is not None:  # finished before the kill: start again from scratch for the next point
            assert proc.returncode == 0
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        for ckpt in list_checkpoints(run):  # whatever was listed as complete is complete
            assert {"state.json", "trainable.safetensors", "optimizer.pt"} <= {p.name for p in ckpt.iterdir()}
        assert not (run / "summary.json").exists()
    train_to_end(run, common)
    assert kills >= 10
    assert_same_run(run, ref_w, ref_steps)


def test_sigterm_checkpoints_exits_75_and_resumes_bit_exact(setup):
    root, common, ref_w, ref_steps = setup
    run = root / "term"
    proc = started(run, common, "metrics.jsonl")
    while not metrics_steps(run):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out = flat(proc.communicate(timeout=300)[0])
    assert proc.returncode == EXIT_INTERRUPTED, out
    assert "interrupted by SIGTERM at step" in out and "resume with: sftlab train" in out
    step = int(out.split("interrupted by SIGTERM at step ")[1].split(":")[0])
    assert 0 < step < STEPS and list_checkpoints(run)[-1].name == f"step-{step:08d}"
    out = train_to_end(run, common)
    assert f"resuming from {run / 'checkpoints' / f'step-{step:08d}'}" in out
    assert_same_run(run, ref_w, ref_steps)


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_a_checkpoint_the_disk_refuses_is_a_clear_error_and_nothing_is_marked_complete(setup):
    root, common, ref_w, ref_steps = setup
    run = root / "full"
    proc = cli(["train", f"output_dir={run}", *common], preexec_fn=_limit_file_size)
    out = flat(proc.communicate(timeout=300)[0])
    assert proc.returncode == 1, out
    assert "step-00000003: could not write the checkpoint (File too large" in out
    assert not list_checkpoints(run) and not any((run / "checkpoints").glob(".*.tmp"))
    assert not (run / "model").exists() and not (run / "summary.json").exists()
    train_to_end(run, common)  # with room again, the run completes
    assert_same_run(run, ref_w, ref_steps)


def test_truncated_newest_checkpoint_falls_back_to_the_previous(setup):
    root, common, ref_w, ref_steps = setup
    run = root / "trunc"
    proc = started(run, common, "checkpoints/step-00000009")
    proc.send_signal(signal.SIGKILL)  # killed after two checkpoints; then the newest one is cut short
    proc.wait()
    newest, previous = list_checkpoints(run)[-1], list_checkpoints(run)[-2]
    blob = newest / "trainable.safetensors"
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    out = train_to_end(run, common)
    assert f"warning: {newest}: unreadable checkpoint" in out and f"resuming from {previous}" in out
    assert_same_run(run, ref_w, ref_steps)


def test_second_writer_is_refused_and_a_finished_run_is_not_trained_again(setup):
    root, common, ref_w, ref_steps = setup
    run = root / "busy"
    first = started(run, common, "config.yaml")
    first.send_signal(signal.SIGSTOP)  # the first run is alive, holding the directory, while the second starts
    try:
        second = cli(["train", f"output_dir={run}", *common])
        out = flat(second.communicate(timeout=300)[0])
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1, out
    assert f"another sftlab process (pid {first.pid} on " in out
    out = flat(first.communicate(timeout=600)[0])
    assert first.returncode == 0, out
    assert_same_run(run, ref_w, ref_steps)
    before = (run / "metrics.jsonl").read_bytes(), (run / "model" / "model.safetensors").stat().st_mtime_ns
    again = cli(["train", f"output_dir={run}", *common])
    out = flat(again.communicate(timeout=300)[0])
    assert again.returncode == 0, out
    assert f"complete {run} already holds this run ({STEPS} steps" in out
    assert before == ((run / "metrics.jsonl").read_bytes(), (run / "model" / "model.safetensors").stat().st_mtime_ns)
    # --no-resume starts over: a fresh log and the same result
    assert "resuming" not in train_to_end(run, common, "--no-resume")
    assert_same_run(run, ref_w, ref_steps)


def test_run_is_one_writer_per_directory_and_logs_an_interruption(setup, tmp_path):
    """`sftlab run` holds its run directory; SIGTERM during its train stage is recorded in run.json, and running
    it again resumes and completes."""
    import threading

    from sftlab.config import load_config
    from sftlab.io import DirectoryBusy, output_lock
    from sftlab.runner import read_log, run_pipeline
    from sftlab.train.lifecycle import TrainingInterrupted

    root, common, ref_w, ref_steps = setup
    run = tmp_path / "run"
    with output_lock(run):
        with pytest.raises(DirectoryBusy, match=rf"another sftlab process \(pid {os.getpid()} on "):
            with output_lock(run):
                pass
    cfg = load_config(None, [f"output_dir={run}", *common, "audit.enabled=false", "report=false"])

    def term_after_first_step():
        while not (run / "train" / "metrics.jsonl").exists() or not metrics_steps(run / "train"):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference run's subprocess (OMP_NUM_THREADS=1): the same float sums
    try:
        threading.Thread(target=term_after_first_step, daemon=True).start()
        with pytest.raises(TrainingInterrupted):
            run_pipeline(cfg)
        entry = read_log(run)["stages"]["train"]
        assert entry["status"] == "interrupted" and entry["signal"] == "SIGTERM" and 0 < entry["step"] < STEPS
        run_pipeline(cfg)
    finally:
        torch.set_num_threads(threads)
    assert read_log(run)["stages"]["train"]["status"] == "complete"
    assert_same_run(run / "train", ref_w, ref_steps)


def test_eval_and_audit_hold_their_directory_and_a_finished_eval_is_not_run_again(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from sftlab.cli import app
    from sftlab.io import output_lock

    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(3)))
    out = tmp_path / "ev"
    args = ["eval", "--model", str(tiny_model_dir), "--general", str(qa), "--out", str(out), "--bootstrap", "20",
            "--qa-max-new-tokens", "2"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    first = (out / "metrics.json").read_bytes()
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and "already holds this evaluation" in flat(r.stderr), r.output
    assert (out / "metrics.json").read_bytes() == first
    r = CliRunner().invoke(app, [*args, "--qa-max-new-tokens", "3"])  # other settings: evaluated again
    assert r.exit_code == 0 and "already holds" not in flat(r.stderr)
    r = CliRunner().invoke(app, [*args, "--no-resume"])
    assert r.exit_code == 0 and "already holds" not in flat(r.stderr)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    for cmd, target in ((args, out), (["audit", str(data), "--model", str(tiny_model_dir), "--out",
                                        str(tmp_path / "au")], tmp_path / "au")):
        with output_lock(target):
            r = CliRunner().invoke(app, cmd)
        assert r.exit_code == 1 and f"another sftlab process (pid {os.getpid()} on " in flat(r.stderr), r.output
