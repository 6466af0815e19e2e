"""benchmarks/vs_trl.py helpers: the step plan both tools train, TRL's inputs, FLOP counts, the ablation's loss."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from sftlab.data.packing import collate_padded
from sftlab.data.tokenize import Example
from sftlab.train.loss import sft_loss_sum

from conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vs_trl", ROOT / "benchmarks" / "vs_trl.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ex(ids, labels):
    return Example(input_ids=list(ids), labels=list(labels))


def toy_examples():
    return [
        ex([5, 6, 7, 8], [-100, -100, 7, 8]),            # 2 targets
        ex([5, 6, 7], [-100, 6, 7]),                      # 2 targets
        ex([1, 2, 3, 4, 5, 6], [-100, -100, -100, -100, 5, 6]),  # 2 targets
        ex([9, 9], [-100, 9]),                            # 1 target
    ]


def test_step_stats_counts_targets_padding_and_attention(bench):
    exs = toy_examples()
    stats = bench.step_stats(exs, [[0, 1], [2, 3]])
    assert stats == [{"examples": 2, "trained": 4, "real": 7, "padded": 8, "sq": 16 + 9},
                     {"examples": 2, "trained": 3, "real": 8, "padded": 12, "sq": 36 + 4}]
    packed = bench.step_stats(exs, [[0, 1, 2, 3]], packed=True)
    assert packed[0]["padded"] == packed[0]["real"] == 15


def test_trl_records_follow_the_plan_and_sftlab_labels(bench):
    exs = toy_examples()
    recs = bench.trl_records(exs, [[2, 0], [3, 1]])
    assert [r["input_ids"] for r in recs] == [exs[i].input_ids for i in (2, 0, 3, 1)]
    # TRL builds labels as input_ids where completion_mask is 1, -100 elsewhere: that must give sftlab's labels
    for r, i in zip(recs, (2, 0, 3, 1)):
        trl_labels = [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])]
        assert trl_labels == exs[i].labels


def test_sftlab_plan_has_one_batch_per_step(bench, tokenizer):
    # the benchmark relies on sftlab planning exactly `steps` batches of batch_size for batch_size * steps examples
    lengths = [3, 9, 4, 4, 7, 1, 2, 8, 5, 6, 3, 2]
    exs = [ex(range(1, n + 1), [-100] + list(range(2, n + 1))) for n in lengths]
    spec = {"model_dir": "x", "data_file": "x.jsonl", "strip": [], "max_length": 16, "batch_size": 4, "steps": 2,
            "warmup": 1, "lr": 1e-5, "seed": 0, "precision": "bf16", "device": "cpu", "threads": 1}
    plan = bench.batch_plan(exs, spec)
    assert sorted(i for b in plan for i in b) == list(range(len(exs)))
    # length-grouped: each batch is a run of the length-sorted order
    for b in plan:
        inside = sorted(lengths[i] for i in b)
        outside = [lengths[i] for i in range(len(exs)) if i not in b]
        assert all(not (inside[0] < n < inside[-1]) for n in outside)


def test_random_plan_is_a_seeded_permutation(bench):
    plan = bench.random_plan(20, 8, seed=3)
    assert [len(b) for b in plan] == [8, 8, 4]
    assert sorted(i for b in plan for i in b) == list(range(20))
    assert plan == bench.random_plan(20, 8, seed=3) != bench.random_plan(20, 8, seed=4)


def test_model_shape_and_step_flops(bench, tmp_path):
    model = make_tiny_llama(vocab_size=300, layers=3, hidden=32)
    model.save_pretrained(tmp_path)
    shape = bench.model_shape(str(tmp_path))
    n_total = sum(p.numel() for p in model.parameters())
    assert shape["tied"] and shape["n_params"] == n_total
    assert shape["n_body"] == n_total - 300 * 32
    assert (shape["hidden"], shape["vocab"], shape["layers"], shape["d_attn"]) == (32, 300, 3, 32)
    stat = {"real": 10, "trained": 4, "sq": 50}
    assert bench.step_flops(shape, stat) == 6 * shape["n_body"] * 10 + 6 * 32 * 300 * 4 + 6 * 3 * 32 * 50


def test_full_logits_loss_equals_chunked_loss(bench):
    # the ablation's "-chunked CE" must compute the same loss, only without chunking
    model = make_tiny_llama(vocab_size=128).float()
    exs = [ex([3, 4, 5, 6, 7], [-100, -100, 5, 6, 7]), ex([8, 9, 10], [-100, 9, 10])]
    batch = collate_padded(exs, pad_token_id=0)
    with torch.no_grad():
        a, na = sft_loss_sum(model, batch, chunk_size=2)
        b, nb = bench.full_logits_loss_sum(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.double(), -1)
    ref = -sum(float(logp[r, t - 1, y]) for r, e in enumerate(exs) for t, y in enumerate(e.labels) if y != -100)
    assert float(na) == float(nb) == 5
    assert math.isclose(float(b), ref, rel_tol=1e-5) and math.isclose(float(a), ref, rel_tol=1e-5)


def test_summarise_run_excludes_warmup_and_checks_steps(bench):
    expected = [{"trained": 10, "padded": 40, "real": 35}, {"trained": 20, "padded": 80, "real": 70},
                {"trained": 30, "padded": 90, "real": 80}]
    run = {"steps": [{"dt": 9.0, "trained": 10, "padded": 40, "loss": 2.0},
                     {"dt": 1.0, "trained": 20, "padded": 80, "loss": 1.9},
                     {"dt": 2.0, "trained": 30, "padded": 90, "loss": 1.8}],
           "peak_rss_mb": 100.0, "first_loss": 2.0}
    s = bench.summarise_run(run, expected, warmup=1)
    assert s["trained_tokens_per_s"] == 50 / 3 and s["s_per_step"] == 1.5 and s["identical_steps"]
    assert s["input_tokens_per_s"] == 150 / 3
    run["steps"][2]["padded"] = 91
    assert not bench.summarise_run(run, expected, warmup=1)["identical_steps"]
    assert bench.summarise_run(run, expected, warmup=1, check_padded=False)["identical_steps"]
