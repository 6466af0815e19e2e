"""`train.precision: bf16-master` (bf16 model, fp32 master weights and AdamW state) and the CPU runtime settings."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import final_weights, make_cfg, write_data

from sftlab.train.loop import train
from sftlab.train.precision import MasterWeights, cast_model
from sftlab.train.runtime import tune_malloc


def _rows(run) -> list[dict]:
    return [json.loads(x) for x in open(run / "metrics.jsonl") if '"loss"' in x]


def test_master_weights_keep_updates_below_bf16_resolution(tmp_path, tiny_model_dir):
    """lr 1e-6: Adam moves each weight by ~1e-6 a step, far below bf16's spacing at the weights' size (~1e-4):
    a bf16 model alone would not move; the fp32 masters do, and the saved model is them, in fp32."""
    steps, lr = 3, 1e-6
    res = train(make_cfg(tmp_path, tiny_model_dir, "run", "train.precision=bf16-master", f"train.max_steps={steps}",
                         "train.batch_size=8", f"train.lr={lr}", "train.scheduler=constant"))
    assert res.steps == steps
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    tuned = final_weights(tmp_path / "run")
    assert all(t.dtype == torch.float32 for t in tuned.values())
    moved = not_bf16 = total = 0
    for name, w in tuned.items():
        d = (w - base[name].float()).abs()
        assert float(d.max()) <= steps * lr * 1.05 + 1e-12, name  # Adam: |update| <= lr per step
        moved += int((d > 0).sum())
        not_bf16 += int((w.to(torch.bfloat16).float() != w).sum())
        total += w.numel()
    assert moved > 0.5 * total  # most weights moved ...
    assert not_bf16 > 0.5 * total  # ... to values a bf16 model could not hold
    assert res.weight_change["overall"] > 0


def test_master_weights_first_loss_matches_fp32_and_loss_drops(tmp_path, tiny_model_dir):
    common = ["train.max_steps=8", "train.batch_size=8", "train.lr=3e-3", "train.scheduler=constant"]
    fp32 = train(make_cfg(tmp_path, tiny_model_dir, "fp32", *common))
    bf16 = train(make_cfg(tmp_path, tiny_model_dir, "bf16m", *common, "train.precision=bf16-master"))
    a, b = _rows(tmp_path / "fp32"), _rows(tmp_path / "bf16m")
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=2e-2)  # same first batch, bf16 activations
    assert b[-1]["loss"] < 0.9 * b[0]["loss"]
    assert bf16.final_loss == pytest.approx(fp32.final_loss, rel=0.05)


def test_master_weights_resume_is_bit_exact_with_mitigations(tmp_path, tiny_model_dir):
    """4 steps straight == 2 steps + resume 2: the checkpoint holds the fp32 masters, not the bf16 weights."""
    write_data(tmp_path / "train.jsonl", n=12)
    common = ["train.precision=bf16-master", "train.batch_tokens=384", "train.scheduler=constant",
              "train.kl_to_base=0.5", "train.l2_to_base=1.0", "train.grad_accum=2"]
    train(make_cfg(tmp_path, tiny_model_dir, "straight", *common, "train.max_steps=4"))
    train(make_cfg(tmp_path, tiny_model_dir, "resumed", *common, "train.max_steps=2"))
    ckpt = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-00000002" / "trainable.safetensors"))
    assert all(t.dtype == torch.float32 for t in ckpt.values())
    train(make_cfg(tmp_path, tiny_model_dir, "resumed", *common, "train.max_steps=4"))
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = _rows(tmp_path / "straight"), _rows(tmp_path / "resumed")
    assert [(r["loss"], r["kl"], r["l2"]) for r in ra] == [(r["loss"], r["kl"], r["l2"]) for r in rb]
    assert ra[-1]["kl"] > 0 and ra[-1]["l2"] > 0


def test_master_weights_with_lora(tmp_path, tiny_model_dir):
    res = train(make_cfg(tmp_path, tiny_model_dir, "lora", "train.precision=bf16-master", "lora.enabled=true",
                         "lora.r=4", "train.max_steps=6", "train.batch_size=8", "train.lr=1e-2",
                         "train.kl_to_base=0.1", f"data.validation=[{tmp_path / 'train.jsonl'}]"))
    rows = _rows(tmp_path / "lora")
    # the loss on the same examples (the training data as validation set) drops: the adapter learned
    assert res.eval_loss < json.loads((tmp_path / "lora" / "summary.json").read_text())["initial_eval_loss"]
    assert rows[-1]["kl"] > 0
    adapter = final_weights(tmp_path / "lora")
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    assert any(float(t.abs().sum()) > 0 for n, t in adapter.items() if "lora_B" in n)
    assert res.weight_change["overall"] > 0


def test_master_weights_helpers_round_trip():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].weight.requires_grad_(False)
    master = MasterWeights(model)
    assert master.names == ["0.weight", "0.bias", "1.bias"]
    cast_model(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    model(torch.randn(5, 4, dtype=torch.bfloat16)).sum().backward()
    master.take_grads()
    assert all(p.grad is None for p in model.parameters())  # moved out of the model
    assert all(m.grad.dtype == torch.float32 for m in master.params)
    grads = [m.grad.clone() for m in master.params]
    model(torch.randn(5, 4, dtype=torch.bfloat16)).sum().backward()
    master.take_grads()  # accumulates in fp32
    assert all(not torch.equal(g, m.grad) for g, m in zip(grads, master.params))
    with torch.no_grad():
        for m in master.params:
            m.add_(1e-4)
    master.to_model()
    assert torch.equal(model[0].weight, master.params[0].to(torch.bfloat16))
    cast_model(model, torch.float32)  # how the loop saves the final model: fp32, then the masters copied in
    master.to_model()
    assert model[0].weight.dtype == torch.float32 and torch.equal(model[0].weight, master.params[0])


def test_tune_malloc_keeps_freed_memory_until_released():
    """After tune_malloc, 1.5 GB of activation-sized heap blocks (16 MiB) freed stay in the process for reuse
    (glibc by default, or with a 1 GiB trim threshold, hands the freed top of the heap back to the OS, and the next
    step faults it in again); release_memory() then gives it back."""
    import ctypes
    import platform

    from sftlab.train.runtime import release_memory

    applied = tune_malloc()
    assert applied == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
    if not applied:
        pytest.skip("malloc tuning is glibc-only")
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]

    def rss_mb() -> float:
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2 ** 20

    size = 16 << 20
    blocks = [libc.malloc(size) for _ in range(96)]
    for ptr in blocks:
        ctypes.memset(ptr, 1, size)
    full = rss_mb()
    for ptr in reversed(blocks):  # top of the heap first, as a step's activations are freed
        libc.free(ptr)
    kept = rss_mb()
    assert kept > full - 100  # kept (with trimming ~1 GB would be gone)
    assert release_memory()
    assert rss_mb() < kept - 1000


@pytest.mark.parametrize("fused", [False, True])
def test_eager_adamw_state_gives_the_same_updates(fused):
    """init_adamw_state (moments allocated before the first step) leaves AdamW's updates bit-identical."""
    from sftlab.train.runtime import init_adamw_state

    torch.manual_seed(0)
    lazy_params = [torch.nn.Parameter(torch.randn(7, 5)) for _ in range(3)]
    eager_params = [torch.nn.Parameter(p.detach().clone()) for p in lazy_params]
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    lazy = torch.optim.AdamW(lazy_params, lr=1e-2, weight_decay=0.1, fused=fused)
    eager = torch.optim.AdamW(eager_params + [frozen], lr=1e-2, weight_decay=0.1, fused=fused)
    init_adamw_state(eager)
    assert all(float(eager.state[p]["exp_avg"].abs().sum()) == 0 for p in eager_params)
    assert frozen not in eager.state
    for _ in range(4):
        for a, b in zip(lazy_params, eager_params):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        lazy.step()
        eager.step()
    for a, b in zip(lazy_params, eager_params):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(lazy.state[a][key], eager.state[b][key])
