"""Tiny random-weight models of the decoder families users fine-tune, from transformers' own config classes.

Each entry: family name -> (config class name, config overrides). Sizes are shared (`BASE`) so every model is
small (2 layers, hidden 32, vocab 512) and fp32; the overrides switch on what makes the family different (a short
sliding window, soft-capping, logit scaling, MoE, MLA) at sizes where a short test sequence exercises it.
Used by tests/test_families.py and by scripts/models_table.py (docs/models.md).
"""

from __future__ import annotations

VOCAB = 512
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            tie_word_embeddings=False)
WINDOW = 5  # a sliding window shorter than the test sequences

FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                                  layer_types=["full_attention", "sliding_attention"])),
    "qwen3": ("Qwen3Config", dict(head_dim=8)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                         decoder_sparse_step=1)),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "gemma": ("GemmaConfig", dict(head_dim=8)),
    "gemma2": ("Gemma2Config", dict(head_dim=8, sliding_window=WINDOW, attn_logit_softcapping=5.0,
                                    final_logit_softcapping=3.0, query_pre_attn_scalar=8)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=8, sliding_window=WINDOW, final_logit_softcapping=3.0,
                                        layer_types=["sliding_attention", "full_attention"],
                                        query_pre_attn_scalar=8)),
    "phi3": ("Phi3Config", dict(pad_token_id=0)),
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", dict(logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5,
                                      attention_multiplier=0.2)),
    "cohere": ("CohereConfig", dict(logit_scale=0.25, tie_word_embeddings=True)),
    "cohere2": ("Cohere2Config", dict(logit_scale=0.25, sliding_window=WINDOW, tie_word_embeddings=True,
                                      layer_types=["sliding_attention", "full_attention"])),
    "gpt_oss": ("GptOssConfig", dict(head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
                                     layer_types=["sliding_attention", "full_attention"])),
    "smollm3": ("SmolLM3Config", {}),
    "glm4": ("Glm4Config", dict(head_dim=8)),
    "deepseek_v3": ("DeepseekV3Config", dict(moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
                                             n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                                             kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
                                             qk_rope_head_dim=4, v_head_dim=8, num_key_value_heads=4)),
    "phi": ("PhiConfig", dict(partial_rotary_factor=0.5)),
    "starcoder2": ("Starcoder2Config", dict(sliding_window=WINDOW)),
    "olmo3": ("Olmo3Config", dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])),
}


def make_model(family: str, seed: int = 0, **overrides):
    """A random-weight `AutoModelForCausalLM` of `family` (fp32, eval mode, eager attention)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    name, extra = FAMILIES[family]
    config = getattr(transformers, name)(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()
