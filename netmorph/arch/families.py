"""Every model family netmorph knows, as data: one `ArchSpec` per family, one table, used by every command.

A spec says where a family keeps each weight (tensor names per *role*), how fused projections are laid out, which
norm / position scheme / biases / sliding windows it uses, and which config fields hold its sizes. The commands
never test `model_type`; they read these fields. Every tensor name below is one that a tiny stock transformers
5.23 model of the family writes to its safetensors file (tests/test_families.py keeps that true; v5 renames some
on save, e.g. GPT-NeoX's lm_head → embed_out).

Each spec names the tensors of the roles in netmorph/ops/roles.py (ROLE_SPACES: the canonical names the math works
with, and the space each reads and writes).
"""

from dataclasses import dataclass, field

from netmorph.errors import NetmorphError

QKV_LAYOUTS = {
    "separate": "three tensors q/k/v",
    "sequential": "one tensor, rows [Q; K; V] (Phi-3; GPT-2's Conv1D stores it transposed: columns [Q | K | V])",
    "interleaved": "one tensor, per head [q_h; k_h; v_h] (GPT-NeoX, Falcon multi_query=False)",
    "grouped": "one tensor, per KV group [q × heads-per-group; k; v] (Falcon new_decoder_architecture; "
    "multi_query=True is the single-group case)",
}

GROW_DIMS = ("num_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size")

STANDARD_LAYER = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
}
QK_NORMS = {"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
# Gemma2/3: input_layernorm → attn → post_attention_layernorm (a post-norm) → residual;
# pre_feedforward_layernorm → mlp → post_feedforward_layernorm → residual
GEMMA2_LAYER = {**STANDARD_LAYER, "attn_post_norm": "post_attention_layernorm", "mlp_norm": "pre_feedforward_layernorm",
                "mlp_post_norm": "post_feedforward_layernorm"}
# OLMo2/3: post-norms only (no pre-norms), q/k norms over the whole projection
OLMO2_LAYER = {**{k: v for k, v in STANDARD_LAYER.items() if not k.endswith("norm")}, **QK_NORMS,
               "attn_post_norm": "post_attention_layernorm", "mlp_post_norm": "post_feedforward_layernorm"}
# Mixture-of-experts layers: attention and the two pre-norms are roles; the router and the experts are not (they
# read and write the residual stream through tensors the MoE block owns: `moe_tensors`).
MOE_LAYER = {k: v for k, v in STANDARD_LAYER.items() if k not in ("gate", "up", "down")}


@dataclass(frozen=True)
class Refusal:
    """Growth dims a family (or a config flag of it) cannot grow exactly, and why — shown to the user as is."""

    dims: tuple[str, ...]
    reason: str
    when: str | None = None  # config field that must be truthy for the refusal to apply (None: always)


@dataclass(frozen=True)
class ArchSpec:
    """One family.

    tensors: role → tensor name under `layer_prefix` (roles and their spaces: ROLE_SPACES). A role whose tensor
        a config does not create (Falcon's optional norms, Llama's optional biases) is simply absent from the file.
    transposed: roles stored as (in, out) — GPT-2's Conv1D — instead of nn.Linear's (out, in).
    qkv_layout: one of QKV_LAYOUTS (applies to the fused "qkv" role).
    kv_heads: how the config gives the KV head count — "field" (`num_key_value_heads`), "heads" (always one KV
        head per query head), or "falcon" (new_decoder_architecture → num_kv_heads; multi_query → 1; else heads).
    norm: "rms" (x/rms·w), "rms_one_plus" (Gemma: x/rms·(1+w)) or "layer" (LayerNorm with bias); `eps_field`
        holds its eps — one field for every norm of the model, q/k norms included.
    qk_norm: "none", "per_head" (over head_dim, one weight shared by the heads: Qwen3, Gemma3; per-head LayerNorms
        when StableLM's `qk_layernorm` is set) or "full_width" (over heads × head_dim: OLMo2).
    rope: "full" (rotate-half over head_dim), "partial" (the first `partial_rotary_factor` of each head; the rest
        passes through), "none" (learned positions: `position_embed`); `alibi_field` names a config flag that
        swaps RoPE for ALiBi (Falcon).
    rotary_halves: the family's rotary embedding returns cos/sin of width head_dim/2, applied to the pairs
        (x[i], x[i + d/2]) (GPT-OSS `_apply_rotary_emb`) — rotate-half with cos/sin repeated twice.
    no_rope_field: config list with one entry per layer, 0 where the layer applies no RoPE (SmolLM3's
        `no_rope_layers`: NoPE on every `no_rope_layer_interval`-th layer).
    attention_scale: "head_dim" (scores × head_dim^−½), "query_pre_attn_scalar" (Gemma2/3: a config constant, ^−½)
        or "attention_multiplier" (Granite: the config's `attention_multiplier` itself is the factor).
    sinks: the attention module's learned per-head sink logits (GPT-OSS `self_attn.sinks`, shape (heads,)): an
        extra softmax column per head that takes probability mass and contributes no value.
    sliding_flag: config flag that must be true for a "sliding_attention" layer to slide (SmolLM3's
        `use_sliding_window`).
    moe_tensors: regexes (under `layer_prefix`) of a mixture-of-experts block's tensors: router and experts, which
        every command passes through unchanged; `moe_writers` the ones among them that write the residual stream
        (experts' down projections and their biases). `experts_fused_on_load`: transformers stores the experts one
        tensor per expert and fuses them into one tensor per layer when it loads the model (Mixtral, Qwen3-MoE), so
        the module names differ from the stored ones (layer-wise verification, which loads modules from stored
        names, refuses such models; full verification loads through transformers).
    dense_mlp_layers: the config fields (`mlp_only_layers`, `decoder_sparse_step`) by which Qwen3-MoE gives some
        layers a dense MLP: layer i is sparse iff i ∉ mlp_only_layers, num_experts > 0 and (i + 1) % step == 0.
    embed_scale: the model multiplies embeddings by √hidden (Gemma family).
    tied: the default of `tie_word_embeddings` when config.json does not say.
    qkv_bias / o_bias / mlp_bias: True, False, or the config field that decides it.
    sliding: "none", "all" (Mistral, Phi-3: every layer when `sliding_window` is set) or "layer_types" (the
        config's per-layer list: Qwen2/3, Gemma2/3).
    config_fields: growth dim → the config field that holds it (GPT-2 spells them n_layer, n_head, …).
    free_head_dim: head_dim is its own config field; otherwise the model derives it as hidden / heads.
    heads_divide_hidden: the config class rejects hidden % heads ≠ 0 even with a free head_dim.
    grow_refuses: what `grow` cannot do exactly for this family, as data (see Refusal).
    """

    model_type: str
    norm: str
    eps_field: str
    tensors: dict = field(default_factory=lambda: dict(STANDARD_LAYER))
    transposed: tuple[str, ...] = ()
    qkv_layout: str = "separate"
    kv_heads: str = "field"
    qk_norm: str = "none"
    qk_norm_field: str | None = None  # config flag that switches the q/k norms on (None: always there when qk_norm)
    rope: str = "full"
    alibi_field: str | None = None
    rotary_halves: bool = False
    no_rope_field: str | None = None
    attention_scale: str = "head_dim"
    sinks: str | None = None
    sliding_flag: str | None = None
    moe_tensors: tuple[str, ...] = ()
    moe_writers: tuple[str, ...] = ()
    experts_fused_on_load: bool = False
    dense_mlp_layers: tuple[str, str] | None = None  # Qwen3-MoE: (list of dense layers, sparse step) config fields
    embed_scale: bool = False
    layer_prefix: str = "model.layers.{i}."
    embed: str = "model.embed_tokens.weight"
    position_embed: str | None = None
    final_norm: str = "model.norm"
    lm_head: str = "lm_head.weight"
    tied: bool = False
    qkv_bias: bool | str = False
    o_bias: bool | str = False
    mlp_bias: bool | str = False
    sliding: str = "none"
    config_fields: dict = field(default_factory=dict)
    free_head_dim: bool = True
    heads_divide_hidden: bool = False
    layer_index_scaling_field: str | None = None  # GPT-2: scores ÷ (layer_idx + 1) when this flag is set (grow
    # rescales q of every layer that moves)
    hidden_growth: str = "fill"  # "fill" (zero/mean-fill, eps × n/n′) or "copies" (whole multiples, eps kept)
    attention_backend: str = "sdpa"  # the backend verification runs on (Gemma2's stock class has no sdpa path)
    grow_refuses: tuple[Refusal, ...] = ()
    # convert-diff-transformer: the attribute names of the q/k norm modules inside the attention module, which
    # move into the differential attention unchanged; and the config fields of the attention's dropouts (on the
    # attention probabilities, and on the output after the out projection — GPT-2's resid_pdrop).
    qk_norm_modules: tuple[str, str] = ("q_norm", "k_norm")
    attention_dropout_field: str | None = "attention_dropout"
    output_dropout_field: str | None = None
    # Tensor-name prefixes transformers renames when it loads the stock class (GPT-NeoX stores lm_head as
    # embed_out): a converted checkpoint, loaded as a new class, stores the module names.
    module_renames: dict = field(default_factory=dict)

    def module_name(self, name: str) -> str:
        """The module path of a stored tensor name."""
        for old, new in self.module_renames.items():
            if name.startswith(old):
                return new + name.removeprefix(old)
        return name

    # ── names ──
    def name(self, layer_idx: int, role: str, kind: str) -> str:
        """The full stored name of role `role`'s tensor in layer `layer_idx`, `kind` "weight" or "bias" (e.g.
        "model.layers.3.self_attn.q_proj.weight"). Raises KeyError for a role this family does not name in `tensors`."""
        return f"{self.layer_prefix.format(i=layer_idx)}{self.tensors[role]}.{kind}"

    @property
    def attention_prefix(self) -> str:
        """The attention module's path inside a layer ("self_attn.")."""
        return self.tensors["o"].rsplit(".", 1)[0] + "."

    def attention_key(self, layer_idx: int, name: str) -> str:
        """The full stored name of `name` (e.g. "q_proj.weight", "lambda_q1") inside the attention module of layer
        `layer_idx`."""
        return f"{self.layer_prefix.format(i=layer_idx)}{self.attention_prefix}{name}"

    # ── config readings ──
    def field(self, dim: str) -> str:
        """The config field that holds growth dim `dim` (one of GROW_DIMS): the family's spelling in `config_fields`,
        else the Llama name. Raises KeyError for any other dim."""
        defaults = {"num_layers": "num_hidden_layers", "intermediate_size": "intermediate_size",
                    "num_attention_heads": "num_attention_heads", "num_key_value_heads": "num_key_value_heads",
                    "head_dim": "head_dim", "hidden_size": "hidden_size"}
        return self.config_fields.get(dim, defaults[dim])

    def bias(self, config, which: str) -> bool:
        """Whether this config's "qkv", "o" or "mlp" projections have biases: the family's fixed value, or the config
        field it names (False when the config lacks it). Raises KeyError for another `which`."""
        value = {"qkv": self.qkv_bias, "o": self.o_bias, "mlp": self.mlp_bias}[which]
        return bool(getattr(config, value, False)) if isinstance(value, str) else value

    def is_tied(self, config) -> bool:
        """Whether the output head is tied to the input embedding: the config's `tie_word_embeddings`, else the
        family default `tied`."""
        return bool(getattr(config, "tie_word_embeddings", self.tied))

    @staticmethod
    def head_dim(config) -> int:
        """head_dim as the stock models derive it: the config's own field when it is set (it is often absent or null
        in real config.json files), else hidden_size / num_attention_heads."""
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @staticmethod
    def rope_parameters(config) -> dict:
        """A copy of the config's RoPE parameters (transformers ≥ 5 reads a legacy top-level `rope_theta` /
        `rope_scaling` into `rope_parameters`); {} for learned positions."""
        return dict(getattr(config, "rope_parameters", None) or {})

    def num_kv_heads(self, config) -> int:
        """The key/value head count of this config per `kv_heads`: "field": the config's num_key_value_heads field
        (the query heads when it is absent or None); "heads": the query heads; "falcon": `num_kv_heads` with
        new_decoder_architecture, else 1 with multi_query (the default when unset), else the query heads."""
        heads = config.num_attention_heads
        if self.kv_heads == "heads":
            return heads
        if self.kv_heads == "falcon":
            if getattr(config, "new_decoder_architecture", False):
                return config.num_kv_heads
            return 1 if getattr(config, "multi_query", True) else heads
        return getattr(config, self.field("num_key_value_heads"), None) or heads

    def kv_heads_rule(self, config) -> str:
        """How growth may set the KV heads: "free", "heads" (always = query heads) or "one" (multi-query)."""
        if self.kv_heads == "falcon" and not getattr(config, "new_decoder_architecture", False):
            return "one" if getattr(config, "multi_query", True) else "heads"
        return "heads" if self.kv_heads == "heads" else "free"

    def rope_kind(self, config) -> str:
        """The position scheme: "alibi" when the family's `alibi_field` flag is set in this config, else the family's
        `rope` ("full", "partial" or "none")."""
        if self.alibi_field and getattr(config, self.alibi_field, False):
            return "alibi"
        return self.rope

    def has_qk_norm(self, config) -> bool:
        """Whether this config's attention has q/k norms: the family has them (`qk_norm` != "none") and
        `qk_norm_field`, when the family names one, is set in the config."""
        return self.qk_norm != "none" and (self.qk_norm_field is None or bool(getattr(config, self.qk_norm_field, False)))

    def refusals(self, config) -> list[Refusal]:
        """The family's growth refusals that apply to this config."""
        return [r for r in self.grow_refuses if r.when is None or getattr(config, r.when, False)]

    def layer_types(self, config) -> list[str]:
        """Per layer, "full_attention" or "sliding_attention" (transformers' names): the config's own `layer_types`
        for `sliding` = "layer_types" when the config has it; every layer sliding for `sliding` = "all" when
        `sliding_window` is set; otherwise every layer full."""
        n = config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        if self.sliding_flag and not getattr(config, self.sliding_flag, False):
            return ["full_attention"] * n
        if self.sliding == "layer_types" and getattr(config, "layer_types", None):
            return list(config.layer_types)
        if self.sliding == "all" and window is not None:
            return ["sliding_attention"] * n
        return ["full_attention"] * n


    def rope_layers(self, config) -> list[bool]:
        """Per layer: does it apply RoPE (False: SmolLM3's NoPE layers, `no_rope_field` entry 0)."""
        if self.rope_kind(config) in ("none", "alibi"):
            return [False] * config.num_hidden_layers
        flags = getattr(config, self.no_rope_field, None) if self.no_rope_field else None
        return [bool(flag) for flag in flags] if flags else [True] * config.num_hidden_layers

    def dense_layers(self, config) -> list[int]:
        """Layers whose MLP is dense in a model that mixes dense and MoE layers (Qwen3-MoE), else []."""
        if not self.dense_mlp_layers:
            return []
        dense_field, step_field = self.dense_mlp_layers
        dense, step = set(getattr(config, dense_field, None) or []), getattr(config, step_field, 1) or 1
        experts = getattr(config, "num_experts", 0) or 0
        return [i for i in range(config.num_hidden_layers) if i in dense or experts == 0 or (i + 1) % step]

    def attention_scaling(self, config, head_dim: int) -> float:
        """The factor on q·k (before any per-layer division)."""
        if self.attention_scale == "query_pre_attn_scalar":
            return config.query_pre_attn_scalar**-0.5
        if self.attention_scale == "attention_multiplier":
            return float(config.attention_multiplier)
        return head_dim**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0


FUSED_EXPERTS = ("transformers fuses its per-expert tensors into one tensor per layer when it loads the model, and "
                 "layer-wise verification loads each module from the stored tensor names")

HEAD_DIM_QK_NORM = "its q/k norms normalise over head_dim, so new head dims would change every existing score"
OLMO_REFUSALS = (
    Refusal(("hidden_size",), "its q/k norms share rms_norm_eps with every norm, so zero-fill (eps × n/n′) cannot be "
            "exact, and whole copies of the residual stream would need more heads (head_dim = hidden / heads)"),
    Refusal(("num_attention_heads", "head_dim"), "its q norm normalises over all heads × head_dim together (and "
            "head_dim is hidden / heads), so new heads or head dims would change the existing scores"),
)
MOE_WIDTH = ("its mixture-of-experts MLP (router and experts) is passed through unchanged: netmorph grows depth and "
             "attention, not the experts' width or the residual stream they read and write")


def _rms(model_type: str, **kwargs) -> ArchSpec:
    return ArchSpec(model_type, **{"norm": "rms", "eps_field": "rms_norm_eps", **kwargs})


FAMILIES: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        _rms("llama", qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias",
             heads_divide_hidden=True),
        _rms("mistral", sliding="all"),
        _rms("qwen2", qkv_bias=True, sliding="layer_types"),
        _rms("qwen3", tensors={**STANDARD_LAYER, **QK_NORMS}, qk_norm="per_head", qkv_bias="attention_bias",
             o_bias="attention_bias", sliding="layer_types", hidden_growth="copies",
             grow_refuses=(Refusal(("head_dim",), HEAD_DIM_QK_NORM),)),
        _rms("gemma", norm="rms_one_plus", embed_scale=True, tied=True),
        _rms("gemma2", norm="rms_one_plus", tensors=GEMMA2_LAYER, embed_scale=True, tied=True, heads_divide_hidden=True,
             attention_backend="eager",
             attention_scale="query_pre_attn_scalar", sliding="layer_types"),
        _rms("gemma3_text", norm="rms_one_plus", tensors={**GEMMA2_LAYER, **QK_NORMS}, qk_norm="per_head",
             embed_scale=True, tied=True, attention_scale="query_pre_attn_scalar", sliding="layer_types",
             heads_divide_hidden=True, hidden_growth="copies", grow_refuses=(Refusal(("head_dim",), HEAD_DIM_QK_NORM),)),
        _rms("olmo2", qk_norm="full_width", free_head_dim=False, qkv_bias="attention_bias",
             o_bias="attention_bias", tensors=OLMO2_LAYER, grow_refuses=OLMO_REFUSALS),
        _rms("phi3", free_head_dim=False, qkv_layout="sequential", rope="partial", sliding="all",
             tensors={"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
                      "down": "mlp.down_proj", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}),
        ArchSpec("stablelm", norm="layer", eps_field="layer_norm_eps", free_head_dim=False, rope="partial",
                 qkv_bias="use_qkv_bias",
                 # per-head LayerNorms (norms.{h}.weight), one per head: kept by name, not grown
                 qk_norm="per_head", qk_norm_field="qk_layernorm", qk_norm_modules=("q_layernorm", "k_layernorm"),
                 grow_refuses=(Refusal(("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size"),
                                       "its per-head q/k norms (qk_layernorm) share the one layer_norm_eps and see "
                                       "head_dim", when="qk_layernorm"),)),
        ArchSpec("gpt_neox", norm="layer", eps_field="layer_norm_eps", free_head_dim=False, heads_divide_hidden=True,
                 qkv_layout="interleaved", kv_heads="heads", rope="partial", qkv_bias="attention_bias",
                 o_bias="attention_bias", mlp_bias=True,
                 layer_prefix="gpt_neox.layers.{i}.", embed="gpt_neox.embed_in.weight",
                 final_norm="gpt_neox.final_layer_norm", lm_head="embed_out.weight",
                 module_renames={"embed_out.": "lm_head."},
                 tensors={"qkv": "attention.query_key_value", "o": "attention.dense", "up": "mlp.dense_h_to_4h",
                          "down": "mlp.dense_4h_to_h", "attn_norm": "input_layernorm",
                          "mlp_norm": "post_attention_layernorm"}),
        ArchSpec("falcon", norm="layer", eps_field="layer_norm_epsilon", free_head_dim=False, heads_divide_hidden=True,
                 qkv_layout="grouped", kv_heads="falcon", alibi_field="alibi", tied=True, qkv_bias="bias",
                 attention_dropout_field=None,
                 o_bias="bias", mlp_bias="bias", layer_prefix="transformer.h.{i}.",
                 embed="transformer.word_embeddings.weight", final_norm="transformer.ln_f",
                 config_fields={"intermediate_size": "ffn_hidden_size", "num_key_value_heads": "num_kv_heads"},
                 # parallel_attn: one input_layernorm feeds both; sequential: input + post_attention;
                 # new_decoder_architecture with num_ln_in_parallel_attn=2: ln_attn + ln_mlp
                 tensors={"qkv": "self_attention.query_key_value", "o": "self_attention.dense",
                          "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h", "attn_norm": "input_layernorm",
                          "mlp_norm": "post_attention_layernorm", "ln_attn": "ln_attn", "ln_mlp": "ln_mlp"},
                 grow_refuses=(Refusal(("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size"),
                                       "ALiBi's per-head slopes depend on the head count and its bias is scaled by "
                                       "head_dim^−½ together with the scores", when="alibi"),)),
        ArchSpec("gpt2", norm="layer", eps_field="layer_norm_epsilon", free_head_dim=False, qkv_layout="sequential",
                 kv_heads="heads", rope="none", tied=True, qkv_bias=True, o_bias=True, mlp_bias=True,
                 layer_prefix="transformer.h.{i}.", embed="transformer.wte.weight",
                 position_embed="transformer.wpe.weight", final_norm="transformer.ln_f",
                 transposed=("qkv", "o", "up", "down"), layer_index_scaling_field="scale_attn_by_inverse_layer_idx",
                 attention_dropout_field="attn_pdrop", output_dropout_field="resid_pdrop",
                 config_fields={"num_layers": "n_layer", "num_attention_heads": "n_head", "hidden_size": "n_embd",
                                "intermediate_size": "n_inner"},
                 tensors={"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj",
                          "attn_norm": "ln_1", "mlp_norm": "ln_2"}),
        # ── issue 21: mixture of experts, sinks, NoPE layers, multipliers (transformers 5.24 modeling files) ──
        # Mixtral: Mistral attention (sliding on every layer when sliding_window is set); block_sparse_moe router
        # `gate` and experts w1 (gate), w3 (up), w2 (down) as saved (transformers fuses them on load)
        _rms("mixtral", sliding="all", tensors=MOE_LAYER,
             moe_tensors=(r"block_sparse_moe\.gate\.weight", r"block_sparse_moe\.experts\.\d+\.w[123]\.weight",
                          r"mlp\.gate\.weight", r"mlp\.experts\.(gate_up_proj|down_proj)"),
             moe_writers=(r"block_sparse_moe\.experts\.\d+\.w2\.weight", r"mlp\.experts\.down_proj"),
             experts_fused_on_load=True,
             grow_refuses=(Refusal(("intermediate_size", "hidden_size"), MOE_WIDTH),)),
        # Qwen3-MoE: Qwen3 attention (per-head q/k norms; sliding on every layer when use_sliding_window); MoE
        # layers hold mlp.gate (router) and mlp.experts.{e}.{gate,up,down}_proj; `mlp_only_layers` keep a dense MLP
        _rms("qwen3_moe", tensors={**STANDARD_LAYER, **QK_NORMS}, qk_norm="per_head", qkv_bias="attention_bias",
             o_bias="attention_bias", sliding="all",
             moe_tensors=(r"mlp\.gate\.weight", r"mlp\.experts\.\d+\.(gate|up|down)_proj\.weight",
                          r"mlp\.experts\.(gate_up_proj|down_proj)"),
             moe_writers=(r"mlp\.experts\.\d+\.down_proj\.weight", r"mlp\.experts\.down_proj"),
             experts_fused_on_load=True, dense_mlp_layers=("mlp_only_layers", "decoder_sparse_step"),
             grow_refuses=(Refusal(("head_dim",), HEAD_DIM_QK_NORM),
                           Refusal(("intermediate_size", "hidden_size"), MOE_WIDTH))),
        # GPT-OSS: learned per-head sinks, alternating sliding/full layers, q/k/v/o biases, half-width rotary
        # cos/sin; MoE with router bias and fused expert tensors with biases
        _rms("gpt_oss", tensors=MOE_LAYER, qkv_bias="attention_bias", o_bias="attention_bias", sliding="layer_types",
             sinks="sinks", rotary_halves=True, attention_backend="eager",
             moe_tensors=(r"mlp\.router\.(weight|bias)", r"mlp\.experts\.(gate_up_proj|down_proj)(_bias)?"),
             moe_writers=(r"mlp\.experts\.down_proj(_bias)?",),
             grow_refuses=(Refusal(("intermediate_size", "hidden_size"), MOE_WIDTH),)),
        # SmolLM3: Llama attention without RoPE on every no_rope_layer_interval-th layer (no_rope_layers[i] == 0)
        _rms("smollm3", qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias",
             free_head_dim=False, sliding="layer_types", sliding_flag="use_sliding_window",
             no_rope_field="no_rope_layers"),
        # Granite: Llama with attention_multiplier as the score factor, embedding_multiplier, residual_multiplier
        # and logits_scaling (the stock model applies the last three; attention keeps the first)
        _rms("granite", qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias",
             free_head_dim=False, attention_scale="attention_multiplier"),
        # OLMo3: OLMo2's post-norms and full-width q/k norms, with sliding layers from layer_types
        _rms("olmo3", qk_norm="full_width", free_head_dim=False, qkv_bias="attention_bias", o_bias="attention_bias",
             tensors=OLMO2_LAYER, sliding="layer_types", grow_refuses=OLMO_REFUSALS),
        # Ministral: Mistral with interleaved sliding/full layers (layer_types)
        _rms("ministral", sliding="layer_types"),
    )
}
# Families netmorph refuses, with the reason (shown by every command).
REFUSED: dict[str, str] = {
    "deepseek_v3": "its multi-head latent attention (MLA) keeps keys and values compressed (kv_a_proj_with_mqa → "
    "kv_b_proj) with one decoupled RoPE key shared by all heads, which netmorph's per-head q/k/v surgeries do not model",
    "qwen3_next": "three of every four layers are Gated-DeltaNet linear attention (no softmax attention to make "
    "differential or to grow by heads), and its full-attention layers gate their output with a sigmoid of extra "
    "query rows",
}
# Which families each command covers (the rest of the table is there for the other commands).
COMMANDS: dict[str, tuple[str, ...]] = {
    "convert-diff-transformer": tuple(FAMILIES),
    "grow": tuple(FAMILIES),
    "qkv-layout": tuple(FAMILIES),
}
VERBS = {"convert-diff-transformer": "convert", "grow": "grow", "qkv-layout": "convert"}


def spec_for(model_type: str, command: str | None = None) -> ArchSpec:
    """The family's spec; with `command`, a one-line error naming the families that command covers."""
    covered = COMMANDS.get(command, tuple(FAMILIES)) if command else tuple(FAMILIES)
    if model_type.startswith("netmorph_diff"):
        raise NetmorphError(
            f"this is already a netmorph differential-attention checkpoint (model_type {model_type!r}), which "
            f"{command or 'netmorph'} does not take as a source: run it on the original model instead"
        )
    if model_type in REFUSED:
        raise NetmorphError(f"unsupported architecture {model_type!r}: {REFUSED[model_type]}; netmorph does not "
                            f"{VERBS.get(command, 'convert')} it")
    if model_type not in covered:
        what = f"{command} supports" if command else "netmorph knows"
        raise NetmorphError(
            f"unsupported architecture {model_type!r}: {what} {', '.join(sorted(covered))}; "
            f"{VERBS.get(command, 'use')} a model of one of these families"
        )
    return FAMILIES[model_type]
