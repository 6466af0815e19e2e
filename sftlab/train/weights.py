"""How far training moved the weights: ||θ-θ0|| / ||θ0|| overall and per module group (summary.json)."""

from __future__ import annotations

import math

import torch

from ..models import load_model


def module_group(name: str) -> str:
    n = name.lower()
    for key, group in (("embed", "embeddings"), ("wte", "embeddings"), ("lm_head", "lm_head"),
                       ("attn", "attention"), ("mlp", "mlp"), ("norm", "norms")):
        if key in n:
            return group
    return "other"


def base_weights(model_path: str) -> dict[str, torch.Tensor]:
    """The base model's weights as loaded for training (θ0), read again from disk after training."""
    return {n: p.detach() for n, p in load_model(model_path, "fp32").named_parameters()}


def weight_change(model, base_path: str, lora: bool) -> dict:
    """Relative change ||θ-θ0|| / ||θ0|| overall and per module group (LoRA: ΔW of each adapted layer).

    θ0 (full fine-tuning) is read from `base_path` after training, so it costs no memory while training."""
    sq_d, sq_0 = {}, {}
    if lora:
        for name, mod in model.named_modules():
            if hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer") and "default" in getattr(mod, "lora_A", {}):
                d = mod.get_delta_weight("default").detach().float()
                # a wrapped parameter (peft's ParamWrapper, e.g. fused MoE experts) or a wrapped layer
                w = (mod.get_param() if hasattr(mod, "get_param") else mod.base_layer.weight).detach().float()
                g = module_group(name)
                sq_d[g] = sq_d.get(g, 0.0) + float(d.pow(2).sum())
                sq_0[g] = sq_0.get(g, 0.0) + float(w.pow(2).sum())
    else:
        theta0 = base_weights(base_path)
        for n, p in model.named_parameters():
            if p.requires_grad and n in theta0 and theta0[n].shape == p.shape:
                g = module_group(n)
                w0 = theta0[n].float().cpu()
                sq_d[g] = sq_d.get(g, 0.0) + float((p.detach().float().cpu() - w0).pow(2).sum())
                sq_0[g] = sq_0.get(g, 0.0) + float(w0.pow(2).sum())
    out = {g: math.sqrt(sq_d[g]) / math.sqrt(sq_0[g]) if sq_0[g] else 0.0 for g in sq_d}
    total0 = sum(sq_0.values())
    out["overall"] = math.sqrt(sum(sq_d.values())) / math.sqrt(total0) if total0 else 0.0
    return out
