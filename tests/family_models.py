"""Tiny random models of the stock transformers classes of every family beyond Llama/Mistral/Qwen2, built in code.

Each config exercises what makes its family different: GQA and a head_dim ≠ hidden/heads where the family allows
it, biases, q/k norms, partial rotary, soft-capping, sliding windows shorter than the test sequences, parallel
residuals, fused QKV in every layout Falcon has. `VARIANTS` names each config the tests run.
"""

from pathlib import Path

import torch
import transformers

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=128, initializer_range=0.2,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
WINDOW = 7
ALTERNATING = ["sliding_attention", "full_attention"]

VARIANTS: dict[str, tuple[str, dict]] = {
    "qwen3": ("Qwen3", dict(hidden_size=36, intermediate_size=56, num_attention_heads=6, num_key_value_heads=2,
                            head_dim=8, attention_bias=True, rms_norm_eps=1e-5, use_sliding_window=True,
                            sliding_window=WINDOW, layer_types=ALTERNATING, tie_word_embeddings=True)),
    "gemma": ("Gemma", dict(hidden_size=36, intermediate_size=56, num_attention_heads=6, num_key_value_heads=2,
                            head_dim=8, rms_norm_eps=1e-5)),
    "gemma2": ("Gemma2", dict(hidden_size=36, intermediate_size=56, num_attention_heads=6, num_key_value_heads=2,
                              head_dim=8, query_pre_attn_scalar=10, attn_logit_softcapping=5.0,
                              final_logit_softcapping=30.0, sliding_window=WINDOW, layer_types=ALTERNATING)),
    "gemma3_text": ("Gemma3", dict(hidden_size=36, intermediate_size=56, num_attention_heads=6, num_key_value_heads=2,
                                   head_dim=8, query_pre_attn_scalar=12, sliding_window=WINDOW,
                                   layer_types=ALTERNATING)),
    "phi3": ("Phi3", dict(hidden_size=48, intermediate_size=56, num_attention_heads=6, num_key_value_heads=2,
                          partial_rotary_factor=0.5, sliding_window=WINDOW, tie_word_embeddings=False)),
    "gpt_neox": ("GPTNeoX", dict(hidden_size=32, intermediate_size=56, num_attention_heads=4, rotary_pct=0.25,
                                 use_parallel_residual=True)),
    "stablelm": ("StableLm", dict(hidden_size=32, intermediate_size=56, num_attention_heads=4, num_key_value_heads=2,
                                  partial_rotary_factor=0.25, use_qkv_bias=True, qk_layernorm=True,
                                  use_parallel_residual=True)),
    "falcon": ("Falcon", dict(hidden_size=32, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
                              alibi=False, bias=False)),
    "falcon-mqa": ("Falcon", dict(hidden_size=32, num_attention_heads=4, multi_query=True,
                                  new_decoder_architecture=False, parallel_attn=True, alibi=False, bias=False)),
    "falcon-mha": ("Falcon", dict(hidden_size=32, num_attention_heads=4, multi_query=False,
                                  new_decoder_architecture=False, parallel_attn=False, alibi=False, bias=True)),
    "gpt2": ("GPT2", dict(n_embd=32, n_head=4, n_layer=2, n_positions=128, scale_attn_by_inverse_layer_idx=True)),
    "olmo2": ("Olmo2", dict(hidden_size=36, intermediate_size=56, num_attention_heads=6, num_key_value_heads=2,
                            head_dim=8, rms_norm_eps=1e-5)),
    # issue 21: mixture of experts (the MLP passes through), sinks, NoPE layers, multipliers
    "mixtral": ("Mixtral", dict(hidden_size=36, intermediate_size=40, num_attention_heads=6, num_key_value_heads=2,
                                head_dim=8, num_local_experts=3, num_experts_per_tok=2, rms_norm_eps=1e-5,
                                sliding_window=WINDOW)),
    # layer 1 keeps a dense MLP (mlp_only_layers); every layer slides (use_sliding_window)
    "qwen3_moe": ("Qwen3Moe", dict(hidden_size=36, intermediate_size=56, moe_intermediate_size=24,
                                   num_attention_heads=6, num_key_value_heads=2, head_dim=8, num_experts=4,
                                   num_experts_per_tok=2, mlp_only_layers=[1], attention_bias=True, rms_norm_eps=1e-5,
                                   use_sliding_window=True, sliding_window=WINDOW)),
    "gpt_oss": ("GptOss", dict(hidden_size=36, intermediate_size=24, num_attention_heads=6, num_key_value_heads=2,
                               head_dim=8, num_local_experts=3, num_experts_per_tok=2, rms_norm_eps=1e-5,
                               sliding_window=WINDOW, layer_types=ALTERNATING)),
    # NoPE on layer 1 (no_rope_layer_interval 2), which also slides (SmolLM3 slides only NoPE layers)
    "smollm3": ("SmolLM3", dict(hidden_size=32, intermediate_size=56, num_attention_heads=4, num_key_value_heads=2,
                                no_rope_layer_interval=2, use_sliding_window=True, sliding_window=WINDOW,
                                attention_bias=True, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "granite": ("Granite", dict(hidden_size=32, intermediate_size=56, num_attention_heads=4, num_key_value_heads=2,
                                attention_multiplier=0.3, embedding_multiplier=2.0, residual_multiplier=0.5,
                                logits_scaling=3.0, attention_bias=True, rms_norm_eps=1e-5)),
    "olmo3": ("Olmo3", dict(hidden_size=36, intermediate_size=56, num_attention_heads=6, num_key_value_heads=2,
                            rms_norm_eps=1e-5, sliding_window=WINDOW, layer_types=ALTERNATING)),
    "ministral": ("Ministral", dict(hidden_size=36, intermediate_size=56, num_attention_heads=6,
                                    num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, sliding_window=WINDOW,
                                    layer_types=ALTERNATING)),
}
CLASS_SUFFIX = {"GPT2": "LMHeadModel"}


def classes(prefix: str):
    config_class = getattr(transformers, "Gemma3TextConfig" if prefix == "Gemma3" else f"{prefix}Config")
    model_class = getattr(transformers, prefix + CLASS_SUFFIX.get(prefix, "ForCausalLM"))
    return config_class, model_class


def family_config(variant: str, **overrides):
    prefix, fields = VARIANTS[variant]
    config_class, _ = classes(prefix)
    settings = {**COMMON, **fields, **overrides}
    if prefix == "GPT2":
        settings.pop("num_hidden_layers", None)
        settings.pop("max_position_embeddings", None)
    return config_class(**settings)


def save_family_model(directory: Path, variant: str, seed: int = 0, **overrides) -> Path:
    """A stock model of the family with random weights — non-trivial norm gains and biases, so a tensor the
    conversion drops or misplaces shows in the logits."""
    torch.manual_seed(seed)
    _, model_class = classes(VARIANTS[variant][0])
    model = model_class(family_config(variant, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.split(".")[-2].startswith("ln"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param) if name.endswith("weight") else 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.3 * torch.randn_like(param))
    model.save_pretrained(directory)
    return directory
