"""FSDP2 (`train.fsdp`) on 2 CPU processes (gloo): the same losses and final weights as 1 process with the same
global batch, full fine-tuning and LoRA; kill -9 mid-run then resume gives weights bit-equal to an uninterrupted
FSDP run; the exported model is an ordinary HF directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sftlab.train import checkpoint as ckpt_mod

from test_train import final_weights, losses, write_data

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "SFTLAB_LOG_EVERY": "0"}


def common(tmp_path, model_dir, *extra):
    data = write_data(tmp_path / "train.jsonl", n=64)
    return [f"model.path={model_dir}", f"data.train=[{data}]", "data.max_length=128", "train.lr=1e-3",
            "train.batch_size=4", "train.seed=2", "model.attn_implementation=eager", *extra]


def one_process(out, args):
    r = subprocess.run([sys.executable, "-m", "sftlab", "train", f"output_dir={out}", "train.grad_accum=2", *args],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def fsdp_cmd(out, args, port):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m",
            "sftlab", "train", f"output_dir={out}", "train.fsdp=true", "train.grad_accum=1", *args]


def two_processes(out, args, port):
    r = subprocess.run(fsdp_cmd(out, args, port), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


VARIANTS = {"full": [], "lora": ["lora.enabled=true", "lora.dropout=0", "train.lr=1e-2"],
            # the KL reference and L2-SP anchor sharded with the model, a token-weighted objective, the drift probe
            "mitigations": ["train.kl_to_base=0.5", "train.l2_to_base=0.1", "train.objective=eaft",
                            "train.drift_examples=4", "data.validation_fraction=0.2", "train.eval_every=2"]}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fsdp_two_processes_match_one(tmp_path, tiny_model_dir, variant):
    lora = variant == "lora"
    args = common(tmp_path, tiny_model_dir, "train.max_steps=5", "train.save_every=2", *VARIANTS[variant])
    one_process(tmp_path / "one", args)
    two_processes(tmp_path / "two", args, 29541 + list(VARIANTS).index(variant))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    if variant == "mitigations":
        rows = {d: [r for r in map(json.loads, open(tmp_path / d / "metrics.jsonl")) if "drift_kl_heldout" in r]
                for d in ("one", "two")}
        assert [r["step"] for r in rows["two"]] == [0, 2, 4, 5]
        for a, b in zip(rows["one"], rows["two"], strict=True):
            assert b["drift_kl_heldout"] == pytest.approx(a["drift_kl_heldout"], rel=1e-3, abs=1e-7)
            assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert a.keys() == b.keys()  # the same HF files (tied head written once)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    ckpt = ckpt_mod.list_checkpoints(tmp_path / "two")[-1]
    assert {p.name for p in ckpt.glob("optimizer-*.pt")} == {"optimizer-0.pt", "optimizer-1.pt"}  # sharded
    assert json.loads((ckpt / "state.json").read_text())["optimizer_shards"] == 2
    if not lora:  # an ordinary HF model directory
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model")
        torch.testing.assert_close(m.model.embed_tokens.weight.detach(), a["model.embed_tokens.weight"])


def kill9_all(marker: str) -> int:
    """SIGKILL every process whose command line mentions `marker`; how many there were."""
    n = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(d.name), signal.SIGKILL)
                n += 1
        except (OSError, ProcessLookupError):
            continue
    return n


def test_fsdp_kill9_then_resume_is_bit_exact(tmp_path, tiny_model_dir):
    args = common(tmp_path, tiny_model_dir, "train.max_steps=40", "train.save_every=4", "train.keep_last=20")
    two_processes(tmp_path / "ref", args, 29545)
    run = tmp_path / "killed"
    proc = subprocess.Popen(fsdp_cmd(run, args, 29546), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ckpt_mod.list_checkpoints(run):
        time.sleep(0.01)
    time.sleep(0.3)
    assert kill9_all(str(run)) >= 3  # the launcher and both training processes (workers have their own sessions)
    proc.wait()
    time.sleep(0.5)
    assert not (run / "model").exists(), "the run finished before it could be killed; make it longer"
    done = [int(p.name.split("-")[1]) for p in ckpt_mod.list_checkpoints(run)]
    assert done and max(done) < 40
    out = two_processes(run, args, 29547)
    assert "resuming from" in out
    a, b = final_weights(tmp_path / "ref"), final_weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_uneven_micro_batches_per_process(tmp_path, tiny_model_dir):
    """60 examples in micro-batches of 4 = 15, 4 a step (2 per process): the last step has 3, so one process has
    one micro-batch fewer — under FSDP it repeats one with weight 0 (every forward is collective), and the result
    is still the 1-process run's."""
    data = write_data(tmp_path / "train.jsonl", n=60)
    args = [f"model.path={tiny_model_dir}", f"data.train=[{data}]", "data.max_length=128", "train.lr=1e-3",
            "train.batch_size=4", "train.batching=length_grouped", "train.seed=2", "model.attn_implementation=eager",
            "train.epochs=1"]
    r = subprocess.run([sys.executable, "-m", "sftlab", "train", f"output_dir={tmp_path / 'one'}",
                        "train.grad_accum=4", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    cmd = fsdp_cmd(tmp_path / "two", args, 29548)
    cmd[cmd.index("train.grad_accum=1")] = "train.grad_accum=2"
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == 4 and two == pytest.approx(one, rel=1e-4)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)


def test_fsdp_through_accelerate_launch(tmp_path, tiny_model_dir):
    """The documented launch: `accelerate launch --config_file configs/accelerate/cpu-2proc.yaml ... train.fsdp=true`
    starts two CPU processes, shards, and matches one process."""
    args = common(tmp_path, tiny_model_dir, "train.max_steps=3", "train.save_every=2")
    one_process(tmp_path / "one", args)
    r = subprocess.run(["accelerate", "launch", "--config_file", str(ROOT / "configs/accelerate/cpu-2proc.yaml"),
                        "--main_process_port", "29549", "-m", "sftlab", "train", f"output_dir={tmp_path / 'two'}",
                        "train.fsdp=true", "train.grad_accum=1", *args],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    ckpt = ckpt_mod.list_checkpoints(tmp_path / "two")[-1]
    assert json.loads((ckpt / "state.json").read_text())["optimizer_shards"] == 2  # two processes, sharded


def test_data_error_on_the_main_process_stops_every_process(tmp_path, tiny_model_dir):
    """The main process prepares the data and sends the others its entry's path; an invalid record stops it, and
    the others get the same `FILE:LINE: reason` instead of waiting for a path that never comes."""
    data = write_data(tmp_path / "train.jsonl", n=16)
    lines = data.read_text().splitlines()
    lines[6] = json.dumps({"prompt": "What is two plus two?"})  # no completion
    data.write_text("\n".join(lines) + "\n")
    cmd = fsdp_cmd(tmp_path / "two", [f"model.path={tiny_model_dir}", f"data.train=[{data}]",
                                      "data.max_length=128", "train.max_steps=1"], 29551)
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, env={**ENV, "TORCHELASTIC_ERROR_FILE": str(tmp_path / "err.json")},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert out.count(f"{data}:7") >= 2, out[-3000:]  # both processes say where
    assert time.monotonic() - t0 < 240  # no process left waiting for the collective timeout
    assert not (tmp_path / "two" / "model").exists()


def test_fsdp_bf16_master_is_fsdp_mixed_precision(tmp_path, tiny_model_dir):
    """precision bf16-master under train.fsdp is FSDP's own MixedPrecisionPolicy: the fp32 shards are the masters
    (at lr 1e-6 they move by amounts a bf16 weight could not hold), forward and backward run in bf16 (the losses
    are one process's bf16-master losses, not its fp32 ones), gradients are reduced in fp32."""
    from safetensors.torch import load_file

    args = common(tmp_path, tiny_model_dir, "train.max_steps=3", "train.lr=1e-6", "train.scheduler=constant",
                  "train.warmup_ratio=0")
    one_process(tmp_path / "bf16m", [*args, "train.precision=bf16-master"])
    one_process(tmp_path / "fp32", [*args, "train.precision=fp32"])
    two_processes(tmp_path / "two", [*args, "train.precision=bf16-master"], 29552)
    two, bf16m, fp32 = (losses(tmp_path / d) for d in ("two", "bf16m", "fp32"))
    assert two == pytest.approx(bf16m, rel=2e-3)
    assert max(abs(a - b) for a, b in zip(two, fp32)) > 3 * max(abs(a - b) for a, b in zip(two, bf16m))
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    final = final_weights(tmp_path / "two")
    masters = final_weights(tmp_path / "bf16m")
    w, w0 = final["model.layers.0.mlp.up_proj.weight"], init["model.layers.0.mlp.up_proj.weight"]
    assert w.dtype == torch.float32
    assert (w != w0).float().mean() > 0.5  # moved by ~3e-6 ...
    assert (w.to(torch.bfloat16).float() != w).float().mean() > 0.5  # ... to values bf16 cannot hold
    m = masters["model.layers.0.mlp.up_proj.weight"]  # one process's: the same updates, bar gradients near zero
    assert (w - m).abs().mean() < 0.1 * (w - w0).abs().mean()
