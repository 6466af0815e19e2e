"""Every decoder family in tests/families.py trains and scores exactly as transformers defines it.

Reference: each example alone (no padding, no packing) through the model's own `forward` with eager attention,
cross-entropy over its trained tokens in fp32. sftlab's path: body + head (`sftlab.lm`, with the family's logit
post-processing) with `segments` attention on right-padded rows and on one packed row. Loss and gradients agree
to 1e-5 relative; the one-time probe (`sftlab.modelcheck`) passes; audit scoring gives the same per-example NLL.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from families import FAMILIES, VOCAB, make_model
from sftlab.attention import register
from sftlab.data.packing import collate_packed, collate_padded
from sftlab.data.tokenize import Example
from sftlab.lm import response_nll
from sftlab.modelcheck import check_training_path
from sftlab.train.loss import sft_kl_loss_sum, sft_loss_sum

LENGTHS = (11, 6, 14)  # longer than the families' sliding window (5)
TOL = 1e-5


def _examples(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        out.append(Example(ids, [-100] * (n // 3) + ids[n // 3:]))
    return out


def _reference(model, examples):
    """(mean NLL over all trained tokens, gradients): each example alone, the model's own eager forward."""
    model.zero_grad()
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        y = torch.tensor(ex.labels[1:])
        keep = y != -100
        total = total + F.cross_entropy(logits[keep], y[keep], reduction="sum")
        count += int(keep.sum())
    loss = total / count
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _sftlab(model, batch):
    model.zero_grad()
    total, count = sft_loss_sum(model, batch)
    loss = total / count
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _segments_copy(model):
    register()
    mine = copy.deepcopy(model)
    mine.set_attn_implementation("segments")
    return mine


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / (b.norm() + 1e-30))


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_loss_and_gradients_equal_eager_transformers(family, layout):
    ref_model = make_model(family)
    model = _segments_copy(ref_model)
    examples = _examples()
    batch = collate_padded(examples, pad_token_id=0) if layout == "padded" else collate_packed(examples)
    ref_loss, ref_grads = _reference(ref_model, examples)
    loss, grads = _sftlab(model, batch)
    assert loss == pytest.approx(ref_loss, rel=TOL)
    assert grads.keys() == ref_grads.keys()
    worst = max(_rel(grads[n], g) for n, g in ref_grads.items() if g.norm() > 0)
    assert worst <= TOL * 10, f"{family}: gradient relative difference {worst:.1e}"
    check_training_path(model, packed=layout == "packed")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scoring_equals_eager_per_example(family):
    """The audit/eval scorer (`lm.response_nll`, head only at scored positions) on right-padded rows."""
    ref_model = make_model(family)
    examples = _examples(seed=1)
    sums = []
    with torch.no_grad():
        for ex in examples:
            logits = ref_model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0, :-1].float()
            y = torch.tensor(ex.labels[1:])
            keep = y != -100
            sums.append(float(F.cross_entropy(logits[keep], y[keep], reduction="sum")))
    sdpa = copy.deepcopy(ref_model)
    sdpa.set_attn_implementation("sdpa" if sdpa._supports_sdpa else "eager")
    got = response_nll(sdpa, collate_padded(examples, pad_token_id=0))
    assert got.sums.tolist() == pytest.approx(sums, rel=TOL)


@pytest.mark.parametrize("family", ["gemma2", "granite", "cohere", "gpt_oss"])
def test_kl_to_base_is_zero_for_the_base_itself(family):
    """KL(p || p_base) through the chunked path uses the post-processed logits on both sides: zero at step 0,
    and the NLL equals the plain loss."""
    model = _segments_copy(make_model(family))
    batch = collate_packed(_examples())
    nll, count, kl = sft_kl_loss_sum(model, batch, base_model=copy.deepcopy(model))
    plain, _ = sft_loss_sum(model, batch)
    assert float(kl) == pytest.approx(0.0, abs=1e-5 * float(count))
    assert float(nll) == pytest.approx(float(plain), rel=TOL)


def _scaled_logits_model():
    from transformers import LlamaForCausalLM

    class ScaledLlama(LlamaForCausalLM):  # a family whose forward post-processes logits in an unknown way
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    ref = make_model("llama")
    model = ScaledLlama(ref.config).eval()
    model.load_state_dict(ref.state_dict())
    return model


def test_unknown_logit_postprocessing_is_an_error_naming_the_model():
    from sftlab.modelcheck import ModelCheckError

    with pytest.raises(ModelCheckError, match="ScaledLlama: its logits are more than its output head"):
        check_training_path(_scaled_logits_model(), packed=False)


def test_segments_refuses_what_it_does_not_implement_and_auto_avoids_it():
    """Chunked attention (Llama-4) is not in `segments`: auto picks transformers' default, an explicit choice
    is an error naming the feature."""
    import transformers
    from families import BASE
    from sftlab.models import resolve_attention, segments_unsupported

    cfg = transformers.Llama4TextConfig(**{**BASE, "attention_chunk_size": 4, "num_local_experts": 2,
                                           "intermediate_size_mlp": 64, "head_dim": 8})
    assert segments_unsupported(cfg)[0].startswith("chunked attention")
    assert resolve_attention("auto", "cpu", training=True, config=cfg) is None
    assert resolve_attention("auto", "cpu", training=True, config=make_model("mistral").config) == "segments"
    with pytest.raises(ValueError, match="chunked attention"):
        resolve_attention("segments", "cpu", training=True, config=cfg)


def test_packing_that_the_model_does_not_keep_apart_is_an_error():
    """A state-space layer (Bamba's Mamba-2) carries state across a packed row: the probe finds it, with the fix."""
    import transformers
    from families import BASE
    from sftlab.modelcheck import ModelCheckError
    from transformers import AutoModelForCausalLM

    cfg = transformers.BambaConfig(**{**BASE, "attn_layer_indices": [1], "mamba_d_state": 8, "mamba_n_heads": 4,
                                      "mamba_d_head": 16, "mamba_chunk_size": 4})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    check_training_path(model, packed=False)  # right-padded rows are exact
    with pytest.raises(ModelCheckError, match="does not keep packed examples apart: set train.batching"):
        check_training_path(model, packed=True)


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss", "granite", "cohere2", "qwen2", "deepseek_v3"])
@pytest.mark.parametrize("batching", ["length_grouped", "packed"])
def test_sftlab_train_first_step_loss_equals_eager_transformers(tmp_path, tokenizer, family, batching):
    """`sftlab train` (auto attention: segments on CPU, fp32): the first step's loss, before any update, is
    transformers' eager loss over the same tokenized examples; LoRA trains only the adapter."""
    from test_train import losses, make_cfg
    from sftlab.data.pipeline import iter_examples
    from sftlab.train.loop import train

    model = make_model(family, vocab_size=len(tokenizer))
    model_dir = tmp_path / family
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    size = ["train.batch_size=48"] if batching == "length_grouped" else ["train.batch_tokens=100000"]
    cfg = make_cfg(tmp_path, model_dir, "run", "model.attn_implementation=auto", f"train.batching={batching}",
                   *size, "train.max_steps=1", "lora.enabled=true", "lora.r=4", "lora.dropout=0")
    train(cfg)
    examples = list(iter_examples(cfg.data.train, tokenizer, cfg.data))
    ref_loss, _ = _reference(model, examples)
    assert losses(tmp_path / "run")[0] == pytest.approx(ref_loss, rel=TOL)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generation_with_the_training_template_equals_plain_greedy(tokenizer, family):
    """`sftlab.generate` (left-padded batches, KV cache, the model's default attention) gives each prompt the
    tokens of plain greedy decoding without cache or padding, with eager attention."""
    from test_generate import greedy_reference
    from sftlab.data.template import resolve_template
    from sftlab.generate import decode_reply, encode_prompt, generate, stop_markers

    ref = make_model(family, vocab_size=len(tokenizer))
    model = copy.deepcopy(ref)
    model.set_attn_implementation("sdpa" if model._supports_sdpa else "eager")
    tmpl = resolve_template("default", tokenizer)
    prompts = ["hi", "What is 23 plus 45? Answer with a number."]  # different lengths: left padding
    got = generate(model, tokenizer, prompts, tmpl, max_new_tokens=4, batch_size=2)
    stops = stop_markers(tmpl, tokenizer)
    want = [decode_reply(greedy_reference(ref, encode_prompt([{"role": "user", "content": p}], tmpl, tokenizer), 4),
                         tokenizer, stops) for p in prompts]
    assert got == want


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_lora_step_changes_only_the_adapter_and_lowers_the_loss(family):
    from sftlab.config import RunConfig
    from sftlab.train.components import apply_lora

    model = _segments_copy(make_model(family)).train()
    cfg = RunConfig.model_validate({"lora": {"enabled": True, "r": 4, "dropout": 0.0}})
    model = apply_lora(model, cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = collate_packed(_examples())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before, count = sft_loss_sum(model, batch)
    (before / count).backward()
    opt.step()
    with torch.no_grad():
        after, _ = sft_loss_sum(model, batch)
    assert float(after) < float(before)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
