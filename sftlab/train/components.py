"""The parts the recipe's setup builds around the model: the LoRA adapter and the learning-rate schedule."""

from __future__ import annotations

import math

from ..config import RunConfig


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
