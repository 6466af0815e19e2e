"""Forgetting mitigations in the training loop: KL to the base model (full and LoRA), L2-SP, replay mixing."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sftlab.config import ConfigError, load_config
from sftlab.data.packing import collate_padded
from sftlab.data.tokenize import Example
from sftlab.models import load_model, load_tokenizer
from sftlab.train.loop import prepare_data, train
from sftlab.train.mitigations import add_l2_grad, frozen_copy, l2_anchor, needs_base_copy, prepare_replay
from sftlab.train.objective import SFTLossModule
from sftlab.train.plan import MicroBatchStream, epoch_batches, replay_count

from conftest import make_tiny_llama
from test_train import final_weights, make_cfg, write_data

V = 1024  # tiny vocabulary for the unit tests: random ids, cheap head


def _examples(seed=0, n=5, weighted=True) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(3, V) for _ in range(rng.randint(6, 14))]
        cut = rng.randint(2, len(ids) - 2)
        labels = [-100] * cut + ids[cut:]
        weights = [0.3] * cut + [1.0] * (len(ids) - cut) if weighted else None
        if weighted:
            labels = list(ids)  # prompt tokens trained with weight 0.3
        out.append(Example(ids, labels, weights))
    return out


def _plain_kl(model, base, batch) -> tuple[float, float, float]:
    """(weighted NLL sum, weight sum, weighted KL(p_model || p_base) sum) from full logits, plain torch."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        lp = F.log_softmax(model(**inputs, use_cache=False).logits.float()[:, :-1], -1)
        lb = F.log_softmax(base(**inputs, use_cache=False).logits.float()[:, :-1], -1)
    y = batch["labels"][:, 1:]
    w = batch["weights"][:, 1:] * (y != -100)
    nll = -lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    kl = F.kl_div(lb, lp, log_target=True, reduction="none").sum(-1)  # sum_v p (log p - log p_base)
    return float((nll * w).sum()), float(w.sum()), float((kl * w).sum())


def _adam_steps(module, batch, kl_weight, steps=5, lr=1e-2):
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        s, w, kl, _ = module(batch)
        ((s + kl_weight * kl) / w).backward()
        opt.step()
        opt.zero_grad()


# ---------------------------------------------------------------------------------------------- KL
def test_kl_is_zero_at_start_and_equals_plain_torch_after_training():
    model = make_tiny_llama(vocab_size=V).train()
    module = SFTLossModule(model, chunk_size=7, kl=True, base_model=frozen_copy(model))
    base = module.base_model
    assert not base.training and not any(p.requires_grad for p in base.parameters())
    assert all(p.dtype == q.dtype for p, q in zip(model.parameters(), base.parameters()))
    batch = collate_padded(_examples(), pad_token_id=2)
    s, w, kl, _ = module(batch)
    assert kl.item() == 0.0  # same weights, same computation: exactly zero
    _adam_steps(module, batch, kl_weight=0.5)
    fresh = collate_padded(_examples(seed=7), pad_token_id=2)
    s, w, kl, _ = module(fresh)
    ref_s, ref_w, ref_kl = _plain_kl(model, base, fresh)
    assert ref_kl > 1e-3, "training did not move the model"
    # fp32 sums of per-token terms: relative to the NLL sum they come from (the KL is a difference of log-probs)
    assert kl.item() == pytest.approx(ref_kl, rel=1e-3, abs=1e-7 * ref_s)
    assert s.item() == pytest.approx(ref_s, rel=1e-5) and w.item() == ref_w
    # the gradient of the chunked KL is the gradient of the plain full-logit KL
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(module(fresh)[2], params)
    inputs = {k: fresh[k] for k in ("input_ids", "attention_mask", "position_ids")}
    lp = F.log_softmax(model(**inputs, use_cache=False).logits.float()[:, :-1], -1)
    with torch.no_grad():
        lb = F.log_softmax(base(**inputs, use_cache=False).logits.float()[:, :-1], -1)
    wts = fresh["weights"][:, 1:] * (fresh["labels"][:, 1:] != -100)
    g_ref = torch.autograd.grad(((lp.exp() * (lp - lb)).sum(-1) * wts).sum(), params)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_lora_kl_disables_the_adapter_and_equals_merged_vs_base():
    from peft import LoraConfig, get_peft_model

    lora_cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                          lora_dropout=0.1)
    peft_model = get_peft_model(make_tiny_llama(vocab_size=V), lora_cfg).train()
    n_params = sum(p.numel() for p in peft_model.parameters())
    calls = {"n": 0}
    real = peft_model.disable_adapter

    def counted():
        calls["n"] += 1
        return real()

    peft_model.disable_adapter = counted
    module = SFTLossModule(peft_model, chunk_size=5, kl=True, base_model=None)
    assert sum(p.numel() for p in module.parameters()) == n_params  # no copy of the base weights
    batch = collate_padded(_examples(seed=3), pad_token_id=2)
    peft_model.eval()  # no LoRA dropout, so the merged model is the same function
    s, w, kl, _ = module(batch)
    assert calls["n"] == 1
    assert sum(p.numel() for p in module.parameters()) == n_params
    merged = copy.deepcopy(peft_model).merge_and_unload()
    base = make_tiny_llama(vocab_size=V)  # the same seed: the weights before the adapter
    ref_s, _, ref_kl = _plain_kl(merged, base, batch)
    assert ref_kl > 1e-4
    assert kl.item() == pytest.approx(ref_kl, rel=1e-3, abs=1e-7 * ref_s)
    assert s.item() == pytest.approx(ref_s, rel=1e-5)  # an fp32 sum of ~200: 1e-5 abs is below its resolution
    # in training mode the reference forward runs without dropout and the modes are restored after it
    peft_model.train()
    modes = [m.training for m in peft_model.modules()]
    torch.manual_seed(0)
    _, _, kl_train, _ = module(batch)
    assert [m.training for m in peft_model.modules()] == modes
    s2, _, _, _ = module(batch, kl=False)  # the adapter is active again after the KL forward
    s_base = _plain_kl(base, base, batch)[0]
    assert abs(s2.item() - s_base) > 1e-3


def test_kl_penalty_keeps_the_tuned_model_closer_to_base():
    """Same data, same steps: λ > 0 ends with a smaller KL to the base on held-out examples than λ = 0."""
    batch = collate_padded(_examples(seed=1, n=8), pad_token_id=2)
    held_out = collate_padded(_examples(seed=2, n=8), pad_token_id=2)
    kl_to_base = {}
    for lam in (0.0, 1.0):
        model = make_tiny_llama(vocab_size=V).train()
        module = SFTLossModule(model, chunk_size=16, kl=True, base_model=frozen_copy(model))
        _adam_steps(module, batch, kl_weight=lam, steps=10)
        _, w, kl = _plain_kl(model, module.base_model, held_out)
        kl_to_base[lam] = kl / w
    assert kl_to_base[0.0] > 0.1
    assert kl_to_base[1.0] < 0.5 * kl_to_base[0.0], kl_to_base


def test_lora_training_with_kl_and_l2_makes_no_base_copy(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, "lora", "lora.enabled=true", "lora.r=4", "train.batch_size=8",
                   "train.max_steps=2", "train.lr=1e-2", "train.kl_to_base=0.1", "train.l2_to_base=0.1")
    assert not needs_base_copy(cfg)  # LoRA uses disable_adapter(), not a copy of the base model
    assert needs_base_copy(cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"enabled": False})}))
    train(cfg)
    rows = [json.loads(x) for x in open(tmp_path / "lora" / "metrics.jsonl") if '"loss"' in x]
    assert rows[0]["kl"] == 0.0 and rows[0]["l2"] == 0.0  # B = 0 at init: the adapter changes nothing yet
    assert rows[1]["kl"] > 0 and rows[1]["l2"] > 0
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()


# ---------------------------------------------------------------------------------------------- L2-SP
def test_l2_gradient_equals_autograd_of_penalty():
    model = make_tiny_llama(vocab_size=V)
    module = SFTLossModule(model, chunk_size=8)
    anchor = l2_anchor(module.model, module.base_model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(anchor) == sorted(names)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    for p in model.parameters():  # some gradient already there from the data term
        p.grad = torch.full_like(p, 0.5)
    lam = 0.3
    penalty = add_l2_grad(dict(model.named_parameters()), anchor, lam)
    ref = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    ref_pen = lam * sum(((ref[n] - anchor[n]) ** 2).sum() for n in names)
    ref_grads = torch.autograd.grad(ref_pen, [ref[n] for n in names])
    assert penalty == pytest.approx(ref_pen.item(), rel=1e-6)
    for n, rg in zip(names, ref_grads):
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, rg + 0.5, atol=1e-7, rtol=1e-6)


def test_l2_anchor_of_lora_is_the_adapter_init_and_of_full_ft_the_base_copy():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(make_tiny_llama(vocab_size=V), LoraConfig(r=4, target_modules=["q_proj"]))
    anchor = l2_anchor(peft_model)
    assert anchor and all("lora_" in n for n in anchor)
    assert all(float(t.abs().sum()) == 0 for n, t in anchor.items() if "lora_B" in n)  # ΔW = 0 at the anchor
    model = make_tiny_llama(vocab_size=V)
    base = frozen_copy(model)
    anchor = l2_anchor(model, base)
    assert all(anchor[n].data_ptr() == p.data_ptr() for n, p in base.named_parameters())  # no second copy


def test_l2_is_added_once_per_optimizer_step_and_logged(tmp_path, tiny_model_dir):
    """Every step trains on the whole data set, as one micro-batch or as two: the same objective and the same
    (pre-clipping) gradient norm at every step, so the penalty's gradient went in once per step, not per micro-batch.
    """
    write_data(tmp_path / "train.jsonl", n=16)
    lam = 0.5
    common = ["train.max_steps=3", f"train.l2_to_base={lam}", "train.save_every=2", "train.lr=3e-3"]
    train(make_cfg(tmp_path, tiny_model_dir, "one", *common, "train.batch_size=16", "train.grad_accum=1"))
    train(make_cfg(tmp_path, tiny_model_dir, "acc", *common, "train.batch_size=8", "train.grad_accum=2"))
    rows = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl") if '"loss"' in x]
    acc = [json.loads(x) for x in open(tmp_path / "acc" / "metrics.jsonl") if '"loss"' in x]
    for r, q in zip(rows, acc):
        for key in ("loss", "sft_loss", "l2", "grad_norm"):
            assert r[key] == pytest.approx(q[key], rel=1e-4), (r["step"], key)
    assert rows[0]["l2"] == 0.0
    # step 3's penalty is λ·||θ2 - θ0||² at the weights the step-2 checkpoint holds
    theta0 = load_file(str(tiny_model_dir / "model.safetensors"))
    theta2 = load_file(str(tmp_path / "one" / "checkpoints" / "step-00000002" / "trainable.safetensors"))
    ref = lam * sum(float((theta2[n].double() - theta0[n].double()).pow(2).sum()) for n in theta2)
    assert ref > 0 and rows[2]["l2"] == pytest.approx(ref, rel=1e-5)
    for r in rows:
        assert r["loss"] == pytest.approx(r["sft_loss"] + r["l2"], rel=1e-9)


# ---------------------------------------------------------------------------------------------- replay
def _fake(n: int, seed: int, task: str) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(4, 30)
        out.append(Example([5] * k, [-100] * (k // 2) + [5] * (k - k // 2), task=task))
    return out


@pytest.mark.parametrize("mode", ["batch_size", "batch_tokens"])
def test_replay_count_per_micro_batch_and_determinism(tmp_path, mode):
    size = "train.batch_size=5" if mode == "batch_size" else "train.batch_tokens=100"
    cfg = load_config(None, ["train.replay.data=[x.jsonl]", "train.replay.ratio=0.25", size, "train.seed=4",
                             "train.epochs=3", "train.grad_accum=2"])
    task, replay = _fake(23, 0, "t"), _fake(7, 1, "replay")
    n = len(task)
    one = MicroBatchStream(task, cfg, per_step=2, replay=replay)
    two = MicroBatchStream(task, cfg, per_step=2, replay=replay)
    assert [one.step(k) for k in range(one.steps)] == [two.step(k) for k in range(two.steps)]
    for epoch in range(3):
        batches = epoch_batches(task, cfg, epoch, replay)
        assert sorted(j for b in batches for j in b if j < n) == list(range(n))  # each task example once
        for b in batches:
            k_task = sum(j < n for j in b)
            drawn = [j for j in b if j >= n]
            assert len(drawn) == replay_count(k_task, 0.25) == max(1, round(k_task / 3))
            assert len(set(drawn)) == len(drawn) and all(j < n + len(replay) for j in drawn)
    draws = [[j for j in b if j >= n] for e in range(3) for b in epoch_batches(task, cfg, e, replay)]
    assert len({tuple(d) for d in draws}) > 1  # the draw depends on (epoch, micro-batch)
    other = load_config(None, ["train.replay.data=[x.jsonl]", "train.replay.ratio=0.25", size, "train.seed=5"])
    assert epoch_batches(task, other, 0, replay) != epoch_batches(task, cfg, 0, replay)
    assert epoch_batches(task, cfg, 0) == epoch_batches(task, cfg, 0, [])  # no pool: the task plan unchanged


def test_replay_packed_adds_a_per_epoch_sample():
    cfg = load_config(None, ["train.replay.data=[x.jsonl]", "train.replay.ratio=0.2", "train.batching=packed",
                             "train.batch_tokens=64", "train.epochs=2.5"])
    task, replay = _fake(40, 0, "t"), _fake(9, 1, "replay")
    n = len(task)
    for epoch in range(3):
        rows = epoch_batches(task, cfg, epoch, replay)
        assert sorted(j for r in rows for j in r if j < n) == list(range(n))
        assert sum(j >= n for r in rows for j in r) == replay_count(n, 0.2) == 10  # 9-pool: one repeats
        assert all(sum(len((task + replay)[j].input_ids) for j in r) <= 64 for r in rows)
    stream = MicroBatchStream(task, cfg, per_step=1, replay=replay)
    lens = [len(epoch_batches(task, cfg, e, replay)) for e in range(3)]
    assert stream.total == lens[0] + lens[1] + round(0.5 * lens[2])
    flat = [b for e in range(3) for b in epoch_batches(task, cfg, e, replay)]
    assert [stream.step(k)[0] for k in range(stream.steps)] == flat[:stream.steps]


def test_replay_loss_counts_replay_tokens_and_summary(tmp_path, tiny_model_dir):
    general = write_data(tmp_path / "general.jsonl", n=10, seed=9)
    cfg = make_cfg(tmp_path, tiny_model_dir, "run", "train.batch_size=6", "train.max_steps=3", "train.grad_accum=2",
                   f"train.replay.data=[{general}]", "train.replay.ratio=0.25")
    train(cfg)
    tok = load_tokenizer(str(tiny_model_dir))
    task_ex, _, _ = prepare_data(cfg, tok)
    replay_ex, _ = prepare_replay(cfg, tok, cfg.data)
    assert {ex.task for ex in replay_ex} == {"replay"}
    stream = MicroBatchStream(task_ex, cfg, per_step=2, replay=replay_ex)
    pool = list(task_ex) + replay_ex
    base = load_model(tiny_model_dir).eval()
    s = w = 0.0  # step 1's loss from full logits at the base weights: every example of both micro-batches
    for b in stream.step(0):
        for j in b:
            ex = pool[j]
            with torch.no_grad():
                logits = base(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1].float()
            y = torch.tensor(ex.labels[1:])
            s += float(F.cross_entropy(logits, y, ignore_index=-100, reduction="sum"))
            w += float((y != -100).sum())
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in x]
    assert rows[0]["loss"] == pytest.approx(s / w, rel=1e-5)
    assert rows[0]["trained_tokens"] == w
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tasks"] == ["repeat", "upper"]  # replay examples are not a training task
    rep = summary["replay"]
    assert rep["pool_examples"] == 10 and rep["trained_examples"] == sum(r["replay_examples"] for r in rows)
    assert rep["trained_tokens"] == pytest.approx(sum(r["replay_tokens"] for r in rows))
    assert rep["trained_examples"] == sum(j >= len(task_ex) for k in range(3) for b in stream.step(k) for j in b)
    assert 0 < rep["token_share"] < 1 and summary["mitigations"]["replay_ratio"] == 0.25


@pytest.mark.parametrize("batching", [["train.batch_size=4"], ["train.batching=packed", "train.batch_tokens=384"]])
def test_resume_with_all_mitigations_is_bit_exact(tmp_path, tiny_model_dir, batching):
    """4 steps straight == 2 steps, then resume for 2 more (crossing an epoch boundary), replay + KL + L2 on."""
    write_data(tmp_path / "train.jsonl", n=12)
    general = write_data(tmp_path / "general.jsonl", n=8, seed=9)
    common = [*batching, "train.scheduler=constant", f"train.replay.data=[{general}]",
              "train.replay.ratio=0.3", "train.kl_to_base=0.5", "train.l2_to_base=1.0"]
    cfg = make_cfg(tmp_path, tiny_model_dir, "straight", *common, "train.max_steps=4")
    tok = load_tokenizer(str(tiny_model_dir))
    assert MicroBatchStream(prepare_data(cfg, tok)[0], cfg, 1, replay=prepare_replay(cfg, tok, cfg.data)[0]).per_epoch < 4
    train(cfg)
    train(make_cfg(tmp_path, tiny_model_dir, "resumed", *common, "train.max_steps=2"))
    res = train(make_cfg(tmp_path, tiny_model_dir, "resumed", *common, "train.max_steps=4"))
    assert res.steps == 4
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = [json.loads(x) for x in open(tmp_path / "straight" / "metrics.jsonl") if '"loss"' in x]
    rb = [json.loads(x) for x in open(tmp_path / "resumed" / "metrics.jsonl") if '"loss"' in x]
    assert len(ra) == len(rb) == 4
    for x, y in zip(ra, rb):
        assert (x["loss"], x["kl"], x["l2"], x["replay_examples"]) == (y["loss"], y["kl"], y["l2"], y["replay_examples"])
    # the logged objective: step 1 runs at the base weights (KL and L2 exactly 0), later steps add both terms
    assert ra[0]["kl"] == 0.0 and ra[0]["l2"] == 0.0 and ra[0]["loss"] == ra[0]["sft_loss"]
    assert ra[-1]["kl"] > 0 and ra[-1]["l2"] > 0
    for r in ra:
        assert r["loss"] == pytest.approx(r["sft_loss"] + 0.5 * r["kl"] + r["l2"], rel=1e-9)
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["mitigations"] == {"replay_ratio": 0.3, "kl_to_base": 0.5, "l2_to_base": 1.0}
    assert summary["replay"]["trained_examples"] == sum(r["replay_examples"] for r in ra)  # resumed steps too


# ---------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("ratio", ["1", "1.5", "-0.1"])
def test_replay_ratio_outside_unit_interval_is_a_config_error(ratio):
    with pytest.raises(ConfigError, match="train.replay.ratio"):
        load_config(None, ["train.replay.data=[a.jsonl]", f"train.replay.ratio={ratio}"])


def test_missing_replay_data_is_an_error(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="train.replay.data: Field required"):
        load_config(None, ["train.replay.ratio=0.2"])
    with pytest.raises(ConfigError, match="train.replay.data: .*no replay data"):
        load_config(None, ["train.replay.data=[]"])
    with pytest.raises(ConfigError, match="train.kl_to_base"):
        load_config(None, ["train.kl_to_base=-1"])
    cfg = make_cfg(tmp_path, tiny_model_dir, "run", f"train.replay.data=[{tmp_path / 'nope.jsonl'}]")
    with pytest.raises(FileNotFoundError, match="train.replay.data: .*nope.jsonl: no such file"):
        train(cfg)
    assert load_config(None, []).train.replay is None  # off by default


def test_replay_keys_are_listed_and_suggested():
    from sftlab.config import ConfigError, config_help, load_config

    rows = {key: (default, desc) for key, default, desc in config_help()}
    assert rows["train.replay"][0] == "None"
    assert rows["train.replay.data"][0] == "(required)" and rows["train.replay.ratio"][0] == "0.1"
    with pytest.raises(ConfigError, match="did you mean 'train.replay.ratio'"):
        load_config(None, ["train.replay.data=[x.jsonl]", "train.replay.rati=0.1"])
