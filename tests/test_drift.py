"""The running forgetting proxy (`train.drift_examples`): KL(p_base ‖ p_tuned) per token on fixed probe sets equals
a plain-torch computation with a frozen copy of the base model, is 0 at step 0, grows with training, is logged with
the eval loss, and a resumed run measures against the same base."""

from __future__ import annotations

import copy
import io
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from sftlab.data.tokenize import Example
from sftlab.train.drift import build_probe, drift_kl, probe_examples

from conftest import make_tiny_llama

V = 512


def examples(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, V, (9 + 2 * i,), generator=g).tolist()
        out.append(Example(ids, [-100] * 4 + ids[4:]))
    return out


def reference_kl(base, tuned, exs) -> float:
    """Mean over scored positions of Σ_v p_base(v) (log p_base(v) − log p_tuned(v)), example by example."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in exs:
            ids = torch.tensor([ex.input_ids])
            lb = F.log_softmax(base(input_ids=ids).logits[0, :-1].float(), -1)
            lt = F.log_softmax(tuned(input_ids=ids).logits[0, :-1].float(), -1)
            scored = torch.tensor(ex.labels[1:]) != -100
            total += float((lb.exp() * (lb - lt)).sum(-1)[scored].sum())
            count += int(scored.sum())
    return total / count


def test_drift_kl_equals_reference_and_starts_at_zero():
    model = make_tiny_llama(vocab_size=V, seed=5)
    base = copy.deepcopy(model)
    sets = {"heldout": examples(), "general": examples(4, seed=1)}
    probe = build_probe(model, sets, pad_id=0, chunk_size=5, batch_tokens=40)
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in drift_kl(model, probe).values())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    got = drift_kl(model, probe)
    for name, exs in sets.items():
        ref = reference_kl(base, model, exs)
        assert ref > 1e-4 and got[name] == pytest.approx(ref, rel=1e-4)


def test_probe_examples_prefer_validation_and_are_seeded():
    train, held = examples(10), examples(5, seed=3)
    name, picked = probe_examples(held, train, 3, seed=0)
    assert name == "heldout" and len(picked) == 3 and all(any(p is h for h in held) for p in picked)
    assert probe_examples(held, train, 3, seed=0)[1] == picked
    name, picked = probe_examples([], train, 20, seed=0)
    assert name == "train" and len(picked) == 10


def test_training_logs_the_proxy_and_resume_measures_against_the_same_base(tmp_path, tiny_model_dir):
    from sftlab.config import load_config
    from sftlab.train.loop import train

    rows = [{"prompt": f"Say {w} twice.", "completion": f" {w} {w}"} for w in
            "red blue green cat dog sun moon tree sky sea".split() * 3]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                          for i in range(6)))
    out = tmp_path / "run"
    cfg = load_config(None, [f"output_dir={out}", f"model.path={tiny_model_dir}", f"data.train=[{data}]",
                             "data.validation_fraction=0.2", "train.max_steps=4", "train.batch_size=4",
                             "train.lr=3e-3", "train.warmup_ratio=0", "train.eval_every=2", "train.save_every=2",
                             "train.keep_last=5", "train.drift_examples=4", f"train.drift_general=[{qa}]",
                             "train.seed=0", "model.attn_implementation=eager"])
    train(cfg)
    log = [json.loads(line) for line in open(out / "metrics.jsonl")]
    drift = [r for r in log if "drift_kl_heldout" in r]
    assert [r["step"] for r in drift] == [0, 2, 4] and all("drift_kl_general" in r for r in drift)
    assert drift[0]["drift_kl_heldout"] == pytest.approx(0.0, abs=1e-5)
    assert drift[0]["drift_kl_general"] == pytest.approx(0.0, abs=1e-5)
    assert drift[-1]["drift_kl_heldout"] > 1e-3 and "eval_loss" in drift[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["drift_kl"] == {"heldout": drift[-1]["drift_kl_heldout"], "general": drift[-1]["drift_kl_general"]}
    # resume from step 2: the probe is rebuilt from the weights as loaded (the base), so the final KL is the same
    shutil.rmtree(out / "model")
    (out / "summary.json").unlink()
    shutil.rmtree(out / "checkpoints" / f"step-{4:08d}")
    console = Console(file=io.StringIO(), width=300)
    train(cfg, console)
    assert "resuming from" in console.file.getvalue()
    again = json.loads((out / "summary.json").read_text())["drift_kl"]
    assert again["heldout"] == pytest.approx(summary["drift_kl"]["heldout"], rel=1e-5)
    assert again["general"] == pytest.approx(summary["drift_kl"]["general"], rel=1e-5)
