"""Configuration of a decoder-only LLM whose attention is differential attention (Ye et al. 2024).

Self-contained (imports only transformers): netmorph copies this file next to every converted checkpoint so that
`AutoConfig.from_pretrained(dir, trust_remote_code=True)` works without netmorph installed.
"""

import transformers
from transformers import PretrainedConfig

DIFF_LAYOUTS = ("doubled", "split", "v2")


class NetmorphDiffConfig(PretrainedConfig):
    """A Llama-family decoder (Llama, Mistral, Qwen2 flavours) with differential attention.

    Differential fields:
        diff_layout: "doubled" — q/k projections have twice the heads: heads [0, H) form the positive component
            and [H, 2H) the negative one; V and O keep their shapes (head value dim d).
            "split" — the H query heads (and KV heads) are halved into positive and negative components, giving H/2
            differential heads whose value dim is 2d (the paper's and DiffLlama's layout).
            "v2" — DIFF V2: q_proj has 2H heads (pairs 2j, 2j + 1), K/V unchanged, λ = sigmoid(lambda_proj(x)) per
            token and head, no λ vectors, mix or sub-layer norm.
        sublayer_norm: per-head RMSNorm (with gain) on the differential output before o_proj, as in the paper.
        lambda_std: std of the normal init of the four λ vectors when a model is created from scratch.
        qkv_bias / o_bias: biases on the q/k/v projections and on o_proj (Llama: both = attention_bias;
            Qwen2: qkv only).
        layer_types: "full_attention" or "sliding_attention" per layer (sliding layers use `sliding_window`).
        source_model_type: the model_type this checkpoint was converted from (informational).
    """

    model_type = "netmorph_diff"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        tie_word_embeddings=False,
        rope_parameters=None,
        attention_dropout=0.0,
        mlp_bias=False,
        qkv_bias=False,
        o_bias=False,
        sliding_window=None,
        layer_types=None,
        diff_layout="doubled",
        sublayer_norm=False,
        lambda_std=0.1,
        source_model_type="llama",
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        **kwargs,
    ):
        if diff_layout not in DIFF_LAYOUTS:
            raise ValueError(f"diff_layout must be one of {DIFF_LAYOUTS}, got {diff_layout!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.qkv_bias = qkv_bias
        self.o_bias = o_bias
        self.sliding_window = sliding_window
        if layer_types is None:
            kind = "sliding_attention" if sliding_window is not None else "full_attention"
            layer_types = [kind] * num_hidden_layers
        self.layer_types = list(layer_types)
        self.diff_layout = diff_layout
        self.sublayer_norm = sublayer_norm
        self.lambda_std = lambda_std
        self.source_model_type = source_model_type
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


def family_config_class(stock_class: type, source_model_type: str) -> type:
    """`NetmorphDiff<Family>Config`: the stock config class of a family under model_type
    "netmorph_diff_<family>", so the stock modeling code reads every field it knows, plus the differential fields
    (stored as extra config attributes):

        diff_layout, sublayer_norm, lambda_std: as in `NetmorphDiffConfig`.
        diff_attention: the attention features per layer, written by the converter — see
            modeling_netmorph_diff.AttentionFeatures and install_differential_attention.
        source_model_type: the family.
    """
    name = f"NetmorphDiff{stock_class.__name__}"
    attributes = {"model_type": f"netmorph_diff_{source_model_type}", "source_family": source_model_type,
                  "__module__": __name__, "__qualname__": name}
    return type(name, (stock_class,), attributes)


NetmorphDiffQwen3Config = family_config_class(transformers.Qwen3Config, "qwen3")
NetmorphDiffGemmaConfig = family_config_class(transformers.GemmaConfig, "gemma")
NetmorphDiffGemma2Config = family_config_class(transformers.Gemma2Config, "gemma2")
NetmorphDiffGemma3TextConfig = family_config_class(transformers.Gemma3TextConfig, "gemma3_text")
NetmorphDiffPhi3Config = family_config_class(transformers.Phi3Config, "phi3")
NetmorphDiffGPTNeoXConfig = family_config_class(transformers.GPTNeoXConfig, "gpt_neox")
NetmorphDiffStableLmConfig = family_config_class(transformers.StableLmConfig, "stablelm")
NetmorphDiffFalconConfig = family_config_class(transformers.FalconConfig, "falcon")
NetmorphDiffGPT2Config = family_config_class(transformers.GPT2Config, "gpt2")
NetmorphDiffOlmo2Config = family_config_class(transformers.Olmo2Config, "olmo2")
