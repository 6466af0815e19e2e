"""Training engine: loss normalisation, exact resume, atomic checkpoints, NaN guard, LoRA merge, multi-process."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sftlab.config import load_config
from sftlab.train import checkpoint as ckpt_mod
from sftlab.train.loop import TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "orbit", "maple", "ember", "quartz", "harbor"]


def write_data(path: Path, n: int = 48, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = rng.sample(WORDS, rng.randint(1, 6))
            msgs = [{"role": "user", "content": "Repeat the words in upper case: " + " ".join(words)},
                    {"role": "assistant", "content": " ".join(w.upper() for w in words)}]
            if i % 5 == 0:  # some multi-turn examples
                msgs += [{"role": "user", "content": "And the first one?"},
                         {"role": "assistant", "content": words[0]}]
            f.write(json.dumps({"messages": msgs, "task": "upper" if i % 2 else "repeat"}) + "\n")
    return path


def make_cfg(tmp_path: Path, model_dir: Path, out: str, *extra: str):
    data = write_data(tmp_path / "train.jsonl") if not (tmp_path / "train.jsonl").exists() else tmp_path / "train.jsonl"
    return load_config(None, [f"output_dir={tmp_path / out}", f"model.path={model_dir}", f"data.train=[{data}]",
                              "data.max_length=128", "data.task_field=task", "train.lr=1e-3", "train.warmup_ratio=0", "train.seed=3",
                              "model.attn_implementation=eager", *extra])


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    d = run / "model" if (run / "model").is_dir() else run / "adapter"
    name = "model.safetensors" if (d / "model.safetensors").is_file() else "adapter_model.safetensors"
    return load_file(str(d / name))


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, open(run / "metrics.jsonl")) if "loss" in r]


def test_loss_normalisation_independent_of_accumulation_and_packing(tmp_path, tiny_model_dir):
    """The first step's loss and update are the same however the global batch is split."""
    base = ["train.epochs=1"]
    one = train(make_cfg(tmp_path, tiny_model_dir, "one", *base, "train.batch_size=48", "train.grad_accum=1"))
    acc = train(make_cfg(tmp_path, tiny_model_dir, "acc", *base, "train.batch_size=6", "train.grad_accum=8"))
    # packed: rows of <=200 tokens; the whole data set in one optimizer step through accumulation
    packed_cfg = make_cfg(tmp_path, tiny_model_dir, "packed", *base, "train.batching=packed",
                          "train.batch_tokens=200", "train.grad_accum=1000")
    packed = train(packed_cfg)
    assert one.final_loss == pytest.approx(acc.final_loss, rel=1e-5)
    assert one.final_loss == pytest.approx(packed.final_loss, rel=1e-5)
    # Adam's first update is ~lr * sign(grad), so compare at 1% of lr (1e-3): float reordering only
    w1, w2, w3 = (final_weights(tmp_path / n) for n in ("one", "acc", "packed"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=0)
        torch.testing.assert_close(w1[k], w3[k], atol=1e-5, rtol=0)


def test_loss_drops_and_output_loads_with_plain_transformers(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = train(make_cfg(tmp_path, tiny_model_dir, "run", "train.epochs=4", "train.batch_size=8",
                         "data.validation_fraction=0.2", "train.eval_every=5"))
    ls = losses(tmp_path / "run")
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    assert tok.convert_tokens_to_ids("<|im_end|>") in list(model.generation_config.eos_token_id or [])
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_loss"] is not None and 0 < summary["weight_change"]["overall"] < 1
    assert set(summary["tasks"]) == {"upper", "repeat"}
    assert res.steps == summary["steps"]


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "sftlab", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_kill9_then_resume_is_bit_exact(tmp_path, tiny_model_dir):
    data = write_data(tmp_path / "train.jsonl", n=96)
    common = [f"model.path={tiny_model_dir}", f"data.train=[{data}]", "data.max_length=128", "train.lr=1e-3",
              "train.batch_size=4", "train.max_steps=60", "train.save_every=4", "train.seed=1",
              "model.attn_implementation=eager", "lora.enabled=false"]
    ref = _run_cli(["train", f"output_dir={tmp_path / 'ref'}", *common])
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    run = tmp_path / "killed"
    proc = _run_cli(["train", f"output_dir={run}", *common])
    deadline = time.time() + 240
    while time.time() < deadline and not ckpt_mod.list_checkpoints(run):
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model").exists(), "the run finished before it could be killed; make it longer"
    done = [int(p.name.split("-")[1]) for p in ckpt_mod.list_checkpoints(run)]
    assert done and max(done) < 60
    resumed = _run_cli(["train", f"output_dir={run}", *common])
    out = resumed.stdout.read()
    assert resumed.wait(timeout=300) == 0, out
    assert "resuming from" in out
    a, b = final_weights(tmp_path / "ref"), final_weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _loss_failing_at(call: int, make_failure):
    """The training loss, except that its `call`-th call (1-based) returns or raises `make_failure(s, w)`."""
    from sftlab.train.loss import sft_loss_sum

    calls = {"n": 0}

    def loss(model, batch, chunk_size=1024):
        calls["n"] += 1
        s, w = sft_loss_sum(model, batch, chunk_size=chunk_size)
        return make_failure(s, w) if calls["n"] == call else (s, w)

    return loss


class _DiesWhileRead(dict):
    """Trainable parameters whose reading stops half-way, as a process killed while writing a checkpoint."""

    def items(self):
        yield from list(super().items())[:1]
        raise KeyboardInterrupt("simulated kill during checkpoint write")


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, "run", "train.batch_size=8", "train.max_steps=4", "train.save_every=2")

    def killed(s, w):
        raise KeyboardInterrupt("simulated kill at step 3")

    with pytest.raises(KeyboardInterrupt):
        train(cfg, loss=_loss_failing_at(3, killed))
    kept = ckpt_mod.list_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["step-00000002"]
    params = load_file(str(kept[0] / "trainable.safetensors"))
    with pytest.raises(KeyboardInterrupt):  # the next checkpoint's write dies half-way
        ckpt_mod.save_checkpoint(tmp_path / "run", 4, _DiesWhileRead(params), None, None, {"step": 4}, keep_last=2)
    assert [p.name for p in ckpt_mod.list_checkpoints(tmp_path / "run")] == ["step-00000002"]
    assert any(p.name.endswith(".tmp") for p in (tmp_path / "run" / "checkpoints").iterdir())
    state = load_file(str(kept[0] / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())
    res = train(cfg)  # resumes from step 2, cleans the partial directory
    assert res.steps == 4
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "run" / "checkpoints").iterdir())


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, "run", "train.batch_size=8", "train.max_steps=6", "train.save_every=2")
    with pytest.raises(TrainingDiverged, match="step 3: loss is nan"):
        train(cfg, loss=_loss_failing_at(3, lambda s, w: (s * float("nan"), w)))
    kept = ckpt_mod.list_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["step-00000002"]
    assert not (tmp_path / "run" / "model").exists()


def test_lora_merged_output_equals_adapter_output(tmp_path, tiny_model_dir):
    from sftlab.models import load_model, merge_adapter

    train(make_cfg(tmp_path, tiny_model_dir, "lora", "lora.enabled=true", "lora.r=4", "lora.dropout=0",
                   "train.batch_size=8", "train.max_steps=5", "train.lr=1e-2"))
    adapter = tmp_path / "lora" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    merged_dir = merge_adapter(adapter, tmp_path / "merged")
    ids = torch.tensor([[1, 523, 8912, 30, 2, 198, 1, 520]])
    with torch.no_grad():
        a = load_model(adapter).eval()(ids).logits
        m = load_model(merged_dir).eval()(ids).logits
        base = load_model(tiny_model_dir).eval()(ids).logits
    assert not torch.allclose(a, base, atol=1e-4), "the adapter did not change the model"
    torch.testing.assert_close(a, m, atol=1e-5, rtol=1e-4)


def test_two_processes_match_one(tmp_path, tiny_model_dir):
    """2 processes (gloo) with grad_accum=1 == 1 process with grad_accum=2: same loss curve and weights."""
    data = write_data(tmp_path / "train.jsonl", n=64)
    common = [f"model.path={tiny_model_dir}", f"data.train=[{data}]", "data.max_length=128", "train.lr=1e-3",
              "train.batch_size=4", "train.max_steps=6", "train.seed=2", "model.attn_implementation=eager"]
    one = _run_cli(["train", f"output_dir={tmp_path / 'one'}", "train.grad_accum=2", *common])
    assert one.wait(timeout=300) == 0, one.stdout.read()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                          "-m", "sftlab", "train", f"output_dir={tmp_path / 'two'}", "train.grad_accum=1", *common],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-5)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_two_trainings_in_one_process_with_different_precision(tmp_path, tiny_model_dir):
    """Library use: train() twice in one process, fp32 then bf16 autocast (accelerate keeps global state)."""
    a = train(make_cfg(tmp_path, tiny_model_dir, "fp32", "train.max_steps=1", "train.batch_size=8"))
    b = train(make_cfg(tmp_path, tiny_model_dir, "bf16", "train.max_steps=1", "train.batch_size=8",
                       "train.precision=bf16"))
    assert a.steps == b.steps == 1
    # same first batch, so the losses agree to bf16 precision but are not bit-identical
    assert abs(a.final_loss - b.final_loss) < 0.05 * a.final_loss
