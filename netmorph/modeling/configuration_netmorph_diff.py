"""Configuration of a decoder-only LLM whose attention is differential attention (Ye et al. 2024).

Self-contained (imports only transformers): netmorph copies this file next to every converted checkpoint so that
`AutoConfig.from_pretrained(dir, trust_remote_code=True)` works without netmorph installed.
"""

from transformers import PretrainedConfig

DIFF_LAYOUTS = ("doubled", "split")


class NetmorphDiffConfig(PretrainedConfig):
    """A Llama-family decoder (Llama, Mistral, Qwen2 flavours) with differential attention.

    Differential fields:
        diff_layout: "doubled" — q/k projections have twice the heads: heads [0, H) form the positive component
            and [H, 2H) the negative one; V and O keep their shapes (head value dim d).
            "split" — the H query heads (and KV heads) are halved into positive and negative components, giving H/2
            differential heads whose value dim is 2d (the paper's and DiffLlama's layout).
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
