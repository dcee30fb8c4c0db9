"""Tiny random models of every family `netmorph grow` supports, built in code with the stock classes."""

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from netmorph.surgery.grow import grow
from netmorph.options import GrowOptions

COMMON = dict(vocab_size=97, num_hidden_layers=2, max_position_embeddings=128, initializer_range=0.2,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Each family at its awkward corners: odd GQA, head_dim ≠ hidden/heads, biases, partial rotary, tied embeddings.
TINY = {
    "llama": dict(hidden_size=36, intermediate_size=56, num_attention_heads=9, num_key_value_heads=3, head_dim=8,
                  rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=True),
    "mistral": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                    rms_norm_eps=1e-5, sliding_window=7),
    "qwen2": dict(hidden_size=36, intermediate_size=56, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                  rms_norm_eps=1e-5, tie_word_embeddings=True, use_sliding_window=True, sliding_window=7,
                  max_window_layers=1),
    "stablelm": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                     layer_norm_eps=1e-5, use_qkv_bias=True, partial_rotary_factor=0.25),
    "gpt_neox": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, layer_norm_eps=1e-5,
                     rotary_pct=0.25, use_parallel_residual=True),
    "phi3": dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                 rms_norm_eps=1e-5, partial_rotary_factor=0.5, pad_token_id=0),
    "gemma": dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  rms_norm_eps=1e-6, tie_word_embeddings=True),
    "qwen3": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                  rms_norm_eps=1e-5, attention_bias=True, tie_word_embeddings=False),
    # softcapping on scores and logits, a score scale that is a config constant, alternating sliding windows
    "gemma2": dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   rms_norm_eps=1e-6, query_pre_attn_scalar=10, attn_logit_softcapping=5.0,
                   final_logit_softcapping=30.0, sliding_window=7),
    "gemma3_text": dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, rms_norm_eps=1e-6, query_pre_attn_scalar=16, sliding_window=7,
                        layer_types=["sliding_attention", "full_attention"]),
    "olmo2": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                  rms_norm_eps=1e-5),
    "gpt2": dict(hidden_size=32, n_inner=48, num_attention_heads=4, layer_norm_epsilon=1e-5),
    # Falcon's four attention shapes: multi-query + parallel attention (the config default, Falcon-7B), grouped
    # (new_decoder_architecture, Falcon-40B), classic MHA with biases and sequential residual (RW), and ALiBi
    "falcon": dict(hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, layer_norm_epsilon=1e-5),
    "falcon_grouped": dict(hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_kv_heads=2,
                           new_decoder_architecture=True, layer_norm_epsilon=1e-5, tie_word_embeddings=False),
    "falcon_mha": dict(hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, multi_query=False,
                       parallel_attn=False, bias=True, layer_norm_epsilon=1e-5),
    "falcon_alibi": dict(hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, multi_query=False, alibi=True,
                         bias=True, layer_norm_epsilon=1e-5),
}
TINY.update({
    # issue 21: mixture of experts (router and experts pass through; new layers' experts write zero), attention
    # sinks, NoPE layers, multipliers, interleaved sliding windows
    "mixtral": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                    num_local_experts=3, num_experts_per_tok=2, rms_norm_eps=1e-5, sliding_window=7),
    "qwen3_moe": dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=12, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1],
                      attention_bias=True, rms_norm_eps=1e-5),
    "gpt_oss": dict(hidden_size=32, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                    num_local_experts=3, num_experts_per_tok=2, rms_norm_eps=1e-5, sliding_window=7,
                    layer_types=["sliding_attention", "full_attention"]),
    "smollm3": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                    no_rope_layer_interval=2, attention_bias=True, rms_norm_eps=1e-5),
    "granite": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                    attention_multiplier=0.3, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=3.0,
                    rms_norm_eps=1e-5, attention_bias=True),
    "olmo3": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                  sliding_window=7, layer_types=["sliding_attention", "full_attention"]),
    "ministral": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                      rms_norm_eps=1e-5, sliding_window=7, layer_types=["sliding_attention", "full_attention"]),
})
MODEL_TYPE = {"falcon_grouped": "falcon", "falcon_mha": "falcon", "falcon_alibi": "falcon"}  # variants of a family
ONE_PLUS_NORMS = ("gemma", "gemma2", "gemma3_text")  # gain 1 + w: stored weights near 0


def tiny_config(family: str, **overrides):
    return AutoConfig.for_model(MODEL_TYPE.get(family, family), **{**COMMON, **TINY[family], **overrides})


def save_tiny(directory: Path, family: str, seed: int = 0, dtype=torch.float32, embed_shift: float = 0.5,
              **overrides) -> Path:
    """A tiny random model with non-trivial norms and biases, and embeddings off-centre by `embed_shift` (so
    LayerNorm means matter: zero-fill instead of mean-fill would show)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_((0.3 if family in ONE_PLUS_NORMS else 1.0) + 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.3 * torch.randn_like(param))
            elif "embed" in name:
                param.add_(embed_shift)
    model.to(dtype).save_pretrained(directory)
    return directory


def grow_tiny(source: Path, output: Path, **options):
    options.setdefault("verify", False)
    return grow(str(source), output, GrowOptions.build(**options))
