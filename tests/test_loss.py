"""The chunked trained-token loss: equal to full-logit cross-entropy (value and gradients), bounded chunks,
per-example token weighting over packed and padded batches, gradient-accumulation equivalence, peft models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sftlab.data.packing import collate_packed, collate_padded
from sftlab.data.tokenize import Example
from sftlab.train.loss import chunked_ce_sum, model_hidden_states, output_head, sft_loss_sum

from conftest import make_tiny_llama

V = 1024  # tiny vocabulary: random ids need no real tokenizer, and the head stays cheap on 2 shared cores


def _reference(hidden, head, labels, weights):
    logits = head(hidden).float()[:, :-1]
    y = labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none", ignore_index=-100)
    w = (y != -100).float() if weights is None else weights[:, 1:] * (y != -100)
    return (nll * w.reshape(-1)).sum(), w.sum()


def _toy(seed=0, b=3, t=11, h=16, v=40):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, requires_grad=True)
    head = torch.nn.Linear(h, v, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g))
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < 0.4] = -100
    labels[1, :] = -100  # a row with nothing trained
    labels[2, -1] = 5  # last position has no next token: never a target
    weights = torch.rand(b, t, generator=g)
    return hidden, head, labels, weights


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1024])
@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_ce_equals_full_cross_entropy(chunk_size, weighted):
    hidden, head, labels, weights = _toy()
    w = weights if weighted else None
    ref_sum, ref_w = _reference(hidden, head, labels, w)
    g_ref = torch.autograd.grad(ref_sum, [hidden, head.weight])
    s, ws = chunked_ce_sum(hidden, head, labels, w, chunk_size=chunk_size)
    g = torch.autograd.grad(s, [hidden, head.weight])
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, ref_sum, atol=1e-5, rtol=0)
    torch.testing.assert_close(ws, ref_w, atol=1e-5, rtol=0)
    if not weighted:
        assert ws.item() == (labels[:, 1:] != -100).sum().item()
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_head_sees_only_trained_positions_one_chunk_at_a_time():
    hidden, head, labels, _ = _toy()
    n_trained = int((labels[:, 1:] != -100).sum())
    rows = []
    head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    s, _ = chunked_ce_sum(hidden, head, labels, chunk_size=4)
    forward_rows = list(rows)
    assert max(forward_rows) <= 4 and sum(forward_rows) == n_trained
    s.backward()
    # backward recomputes each chunk's logits (checkpoint), again never more than one chunk
    assert rows[len(forward_rows):] and max(rows) <= 4 and sum(rows) == 2 * n_trained


def test_bf16_hidden_gives_fp32_loss():
    hidden, head, labels, _ = _toy()
    hb, headb = hidden.detach().bfloat16(), head.bfloat16()
    s, ws = chunked_ce_sum(hb, headb, labels, chunk_size=5)
    ref, ref_w = _reference(hb, headb, labels, None)
    assert s.dtype == torch.float32 and ws.item() == ref_w.item()
    torch.testing.assert_close(s, ref, atol=1e-4, rtol=1e-5)


def test_nothing_trained_is_zero_and_differentiable():
    hidden, head, labels, _ = _toy()
    labels[:] = -100
    s, ws = chunked_ce_sum(hidden, head, labels)
    s.backward()
    assert s.item() == 0.0 and ws.item() == 0.0
    assert hidden.grad is not None and hidden.grad.abs().sum() == 0


def _examples(seed, n=6, weighted=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        length = int(torch.randint(6, 30, (1,), generator=g))
        ids = torch.randint(3, V, (length,), generator=g).tolist()
        cut = int(torch.randint(1, length - 1, (1,), generator=g))
        if weighted:  # prompt_loss_weight > 0: every label kept, prompt tokens down-weighted
            out.append(Example(ids, list(ids), [0.1] * cut + [1.0] * (length - cut)))
        else:
            out.append(Example(ids, [-100] * cut + ids[cut:]))
    return out


def _per_example_nll(model, ex):
    """NLL sum and weight sum of one example run alone, from full logits."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1].float()
    y = torch.tensor(ex.labels[1:])
    w = torch.ones(len(y)) if ex.weights is None else torch.tensor(ex.weights[1:])
    w = w * (y != -100)
    nll = F.cross_entropy(logits, y, reduction="none", ignore_index=-100)
    return float((nll * w).sum()), float(w.sum())


@pytest.mark.parametrize("weighted", [False, True])
def test_packed_and_padded_loss_is_token_weighted_mean_of_examples(weighted):
    model = make_tiny_llama(vocab_size=V)
    examples = _examples(seed=1, weighted=weighted)
    ref = [_per_example_nll(model, ex) for ex in examples]
    ref_loss = sum(s for s, _ in ref) / sum(w for _, w in ref)
    # the loop's normaliser (trained targets: labels[1:]) is exactly the weight sum returned here
    loop_weight = sum(sum(w for w, y in zip((ex.weights or [1.0] * len(ex.labels))[1:], ex.labels[1:]) if y != -100)
                      for ex in examples)
    with torch.no_grad():
        for batch in (collate_packed(examples), collate_padded(examples, pad_token_id=2)):
            s, ws = sft_loss_sum(model, batch, chunk_size=16)
            assert ws.item() == pytest.approx(loop_weight, abs=1e-5)
            assert s.item() / ws.item() == pytest.approx(ref_loss, rel=1e-5)
    if not weighted:  # and HF's own mean loss of one example agrees
        with torch.no_grad():
            hf = model(input_ids=torch.tensor([examples[0].input_ids]), labels=torch.tensor([examples[0].labels])).loss
        assert ref[0][0] / ref[0][1] == pytest.approx(hf.item(), rel=1e-5)


@pytest.mark.parametrize("collate", ["packed", "padded"])
def test_gradient_accumulation_equals_full_batch(collate):
    model = make_tiny_llama(vocab_size=V).train()
    examples = _examples(seed=2, n=6)
    make = (lambda exs: collate_packed(exs)) if collate == "packed" else (lambda exs: collate_padded(exs, 2))
    params = [p for p in model.parameters() if p.requires_grad]

    s, ws = sft_loss_sum(model, make(examples), chunk_size=8)
    full_loss = s / ws
    full_grads = torch.autograd.grad(full_loss, params)

    micro = [make(examples[k:k + 2]) for k in range(0, 6, 2)]
    with torch.no_grad():
        total_w = sum(sft_loss_sum(model, b)[1] for b in micro)  # the loop knows this before the step
    model.zero_grad()
    acc_loss = 0.0
    for b in micro:
        s_i, _ = sft_loss_sum(model, b, chunk_size=8)
        (s_i / total_w).backward()
        acc_loss += float(s_i.detach())
    assert acc_loss / float(total_w) == pytest.approx(full_loss.item(), rel=1e-5)
    for p, g in zip(params, full_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=0)


def test_peft_model_runs_body_with_lora_active():
    from peft import LoraConfig, get_peft_model

    lora_cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(make_tiny_llama(vocab_size=V), lora_cfg)
    ids = torch.tensor([_examples(seed=3, n=1)[0].input_ids])
    batch = {"input_ids": ids}
    with torch.no_grad():
        logits = output_head(model)(model_hidden_states(model, batch))
        torch.testing.assert_close(logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        assert (logits - base).abs().max() > 1e-3  # the adapters changed the output, so they were active
    ex = _examples(seed=3, n=1)[0]
    s, ws = sft_loss_sum(model, collate_packed([ex]))
    s.backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_response_nll_per_example_equals_transformers_loss():
    """The one response-token NLL (audit, eval, validation): per row of a padded batch, HF's own loss x count;
    the head sees only the scored positions, one chunk at a time; the full-forward path agrees."""
    from sftlab.lm import response_nll

    model = make_tiny_llama(vocab_size=V).eval()
    examples = _examples(seed=4, n=5)
    batch = collate_padded(examples, pad_token_id=2)
    rows = []
    hook = output_head(model).register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    res = response_nll(model, batch, chunk_size=8, pool=True)
    hook.remove()
    n_scored = sum(sum(y != -100 for y in ex.labels[1:]) for ex in examples)
    assert max(rows) <= 8 and sum(rows) == n_scored
    full = response_nll(model, batch, head_only=False)
    for r, ex in enumerate(examples):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels]),
                        output_hidden_states=True)
        n = sum(y != -100 for y in ex.labels[1:])
        assert int(res.counts[r]) == n and res.means[r] == pytest.approx(out.loss.item(), abs=1e-5)
        assert float(full.sums[r]) == pytest.approx(float(res.sums[r]), abs=1e-4)
        torch.testing.assert_close(res.pooled[r], out.hidden_states[-1][0].mean(0), atol=1e-5, rtol=0)
