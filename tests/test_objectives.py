"""Token-weighted SFT objectives (`train.objective`): DFT and EAFT weights and gradients equal a plain-torch
reference over full logits, the weights are detached, chunking changes nothing, ASFT is DFT + the KL term, and
validation stays the plain NLL whatever is optimised."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sftlab.data.packing import collate_packed, collate_padded
from sftlab.data.tokenize import Example
from sftlab.train.loss import TokenObjective, chunked_objective_sums, sft_kl_loss_sum, sft_objective_sums
from sftlab.train.objective import SFTLossModule

from conftest import make_tiny_llama

V = 512


def reference_weights(logits: torch.Tensor, targets: torch.Tensor, kind: str, k: int = 20, alpha: float = 1.0):
    """Independent definitions over full fp32 logits [N, V]: DFT p(y_t); EAFT (H(softmax(top-k logits)) / ln k)^alpha."""
    p = torch.softmax(logits, dim=-1)
    if kind == "dft":
        return p.gather(1, targets[:, None])[:, 0]
    top = torch.sort(logits, dim=-1, descending=True).values[:, :k]
    q = torch.exp(top - torch.logsumexp(top, dim=-1, keepdim=True))
    h = -(q * torch.log(q)).sum(-1)
    return (h / math.log(k)) ** alpha


def reference_loss(model, batch, kind: str, **kw):
    """Σ sg(w_t) · NLL_t over trained positions from the model's own full logits, and Σ 1."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits.float()
    y = batch["labels"][:, 1:].reshape(-1)
    logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    keep = y != -100
    logits, y = logits[keep], y[keep]
    nll = F.cross_entropy(logits, y, reduction="none")
    w = torch.ones_like(nll) if kind == "nll" else reference_weights(logits.detach(), y, kind, **kw)
    return (w * nll).sum(), nll.sum(), float(keep.sum()), w


def batch_of(n=3, seed=0, length=13):
    g = torch.Generator().manual_seed(seed)
    exs = []
    for i in range(n):
        ids = torch.randint(3, V, (length + i,), generator=g).tolist()
        labels = [-100] * 5 + ids[5:]
        exs.append(Example(ids, labels))
    return collate_padded(exs, pad_token_id=0)


@pytest.mark.parametrize("kind,kw", [("nll", {}), ("dft", {}), ("eaft", {}), ("eaft", {"k": 5, "alpha": 0.5})])
@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_objective_value_and_gradients_equal_full_logit_reference(kind, kw, chunk_size):
    model = make_tiny_llama(vocab_size=V, seed=1)
    batch = batch_of()
    params = [p for p in model.parameters() if p.requires_grad]
    ref, ref_nll, count, _ = reference_loss(model, batch, kind, **kw)
    g_ref = torch.autograd.grad(ref, params)
    obj = TokenObjective(kind, kw.get("k", 20), kw.get("alpha", 1.0))
    r = sft_objective_sums(model, batch, obj, chunk_size=chunk_size)
    g = torch.autograd.grad(r.objective, params)
    assert r.weight.item() == count and r.kl is None
    torch.testing.assert_close(r.objective, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.nll, ref_nll, rtol=1e-5, atol=1e-5)  # the plain NLL beside it, for the logs
    assert not r.nll.requires_grad
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * max(1.0, b.abs().max().item()))
    if kind != "nll":
        assert not torch.allclose(r.objective, r.nll)  # the weighting did something


def test_token_weights_match_reference_and_are_detached():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, V, generator=g) * 4).requires_grad_()
    y = torch.randint(0, V, (64,), generator=g)
    nll = F.cross_entropy(logits, y, reduction="none")
    for kind in ("dft", "eaft"):
        w = TokenObjective(kind).token_weights(logits, nll)
        assert not w.requires_grad
        torch.testing.assert_close(w, reference_weights(logits.detach(), y, kind), rtol=1e-5, atol=1e-6)
    assert TokenObjective("nll").token_weights(logits, nll) is None


def test_eaft_weight_separates_confident_from_uncertain_tokens():
    flat = torch.zeros(2, V)  # uniform over the top 20: normalised entropy 1
    confident = torch.zeros(2, V)
    confident[:, 7] = 30.0  # one logit far ahead: entropy ~0, whatever the label
    nll = torch.zeros(2)
    eaft = TokenObjective("eaft")
    torch.testing.assert_close(eaft.token_weights(flat, nll), torch.ones(2))
    assert eaft.token_weights(confident, nll).max() < 1e-9
    # DFT instead weights by the label's probability: a confident conflict (label 3, model sure of 7) gets ~0 too,
    # but so does any unlikely label under a flat distribution; EAFT keeps that one at full weight
    labels = torch.tensor([3, 3])
    d = TokenObjective("dft").token_weights(flat, F.cross_entropy(flat, labels, reduction="none"))
    torch.testing.assert_close(d, torch.full((2,), 1 / V))


def test_objective_respects_example_weights_and_packing():
    model = make_tiny_llama(vocab_size=V, seed=2)
    exs = [Example(list(range(3, 3 + n)), [-100] * 2 + list(range(5, 3 + n)), weights=[wt] * n) for n, wt in
           ((9, 1.0), (12, 0.5), (7, 2.0))]
    obj = TokenObjective("dft")
    packed = sft_objective_sums(model, collate_packed(exs), obj, chunk_size=4)
    padded = sft_objective_sums(model, collate_padded(exs, pad_token_id=0), obj, chunk_size=1024)
    torch.testing.assert_close(packed.objective, padded.objective, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed.weight, padded.weight)
    one_by_one = sum(sft_objective_sums(model, collate_padded([e], pad_token_id=0), obj).objective for e in exs)
    torch.testing.assert_close(padded.objective, one_by_one, rtol=1e-4, atol=1e-5)


def test_asft_is_dft_plus_the_kl_term():
    import copy

    model = make_tiny_llama(vocab_size=V, seed=3)
    base = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = batch_of(seed=4)
    module = SFTLossModule(model, chunk_size=5, kl=True, base_model=base, objective=TokenObjective("dft"))
    r = module(batch)
    dft = sft_objective_sums(model, batch, TokenObjective("dft"))
    _, _, kl = sft_kl_loss_sum(model, batch, base_model=base)
    torch.testing.assert_close(r.objective, dft.objective, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.kl, kl, rtol=1e-5, atol=1e-6)
    assert r.kl.item() > 0
    plain = module(batch, kl=False, weighted=False)  # what validation reads
    assert plain.kl is None
    torch.testing.assert_close(plain.objective, dft.nll, rtol=1e-5, atol=1e-5)


def test_chunked_objective_sums_checks_base_shapes():
    hidden = torch.randn(1, 4, 8)
    head = torch.nn.Linear(8, 16, bias=False)
    labels = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="base hidden states"):
        chunked_objective_sums(hidden, head, labels, base_hidden=torch.randn(1, 3, 8), base_head=head)
    with pytest.raises(ValueError, match="top_k"):
        TokenObjective("eaft", top_k=1)
    with pytest.raises(ValueError, match="objective"):
        TokenObjective("focal")


def test_training_with_dft_logs_objective_and_validates_on_plain_nll(tmp_path, tiny_model_dir):
    from sftlab.config import load_config
    from sftlab.train.loop import train

    rows = [{"prompt": f"Say {w} twice.", "completion": f" {w} {w}"} for w in
            "red blue green cat dog sun moon tree sky sea".split() * 3]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    initial = {}
    for kind in ("nll", "dft", "eaft"):
        out = tmp_path / kind
        train(load_config(None, [f"output_dir={out}", f"model.path={tiny_model_dir}", f"data.train=[{data}]",
                                 "data.validation_fraction=0.2", "train.max_steps=2", "train.batch_size=4",
                                 f"train.objective={kind}", "train.seed=0", "train.warmup_ratio=0",
                                 "model.attn_implementation=eager"]))
        log = [json.loads(line) for line in open(out / "metrics.jsonl")]
        steps = [r for r in log if "loss" in r]
        summary = json.loads((out / "summary.json").read_text())
        initial[kind] = summary["initial_eval_loss"]
        assert summary["objective"]["kind"] == kind
        if kind == "nll":
            assert "objective" not in steps[0]
        else:
            assert steps[0]["objective"] == steps[0]["loss"] and steps[0]["sft_loss"] > steps[0]["objective"]
    # validation is the plain NLL of the same base model on the same held-out examples, whatever is optimised
    assert initial["nll"] == pytest.approx(initial["dft"], rel=1e-6) == pytest.approx(initial["eaft"], rel=1e-6)
