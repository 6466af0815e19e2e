"""The parts the recipe's setup builds around the model: the checked model, the LoRA adapter and the
learning-rate schedule."""

from __future__ import annotations

import math
import warnings

from ..config import RunConfig
from ..modelcheck import ModelCheckError, check_training_path
from ..models import load_model, model_config, resolve_attention


def load_training_model(cfg: RunConfig, device_type: str):
    """The model with the attention `model.attn_implementation` resolves to, checked once against its own eager
    forward (`modelcheck.check_training_path`). Under `auto`, a model that `segments` does not reproduce falls back
    to transformers' default attention (with a warning); a choice the user made is an error instead."""
    m = cfg.model
    attn = resolve_attention(m.attn_implementation, device_type, training=True,
                             config=model_config(m.path, m.trust_remote_code))
    model = load_model(m.path, m.dtype, attn, m.trust_remote_code)
    packed = cfg.train.batching == "packed"
    try:
        check_training_path(model, packed)
    except ModelCheckError as e:
        if not (m.attn_implementation == "auto" and attn == "segments"):
            raise
        fallback = "sdpa" if model._supports_sdpa else "eager"
        warnings.warn(f"{e}; model.attn_implementation=auto uses {fallback} instead", stacklevel=2)
        model.set_attn_implementation(fallback)
        check_training_path(model, packed)
    return model


def apply_lora(model, cfg: RunConfig):
    from peft import LoraConfig, get_peft_model

    lc = cfg.lora
    return get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                            target_modules=lc.target_modules, use_dora=lc.use_dora,
                                            task_type="CAUSAL_LM"))


def lr_lambda(total_steps: int, warmup_steps: int, kind: str):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress_)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))
    return f
