"""What `netmorph grow` needs to know about each family, as data: tensor names, fused layouts, norm kind, which
config fields tie dimensions together. The recipes themselves live in netmorph/ops/grow.py."""

from dataclasses import dataclass, field

from netmorph.errors import NetmorphError

STANDARD_LAYER = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
}


@dataclass(frozen=True)
class GrowSpec:
    """One family.

    layer_tensors: canonical role → tensor name under the layer prefix (roles: q k v o gate up down attn_norm
        mlp_norm, or the fused qkv / gate_up).
    qkv_layout: "separate", "blocks" (Phi-3: rows [Q; K; V]) or "per_head" (GPT-NeoX: rows [q_h; k_h; v_h] per head).
    norm: "rms" (gain w), "rms_one_plus" (Gemma: gain 1 + w) or "layer" (LayerNorm with bias).
    free_head_dim: head_dim is its own config field; otherwise the model derives it as hidden / heads.
    heads_divide_hidden: the config class rejects hidden % heads ≠ 0 even with a free head_dim (Llama, NeoX).
    embed_scale: the model multiplies embeddings by √hidden (Gemma).
    per_head_norm_field: config flag that adds per-head q/k norms (StableLM qk_layernorm): those norms see
        head_dim and share the one eps field, so head/hidden growth would not be exact.
    """

    model_type: str
    norm: str
    eps_field: str
    layer_tensors: dict = field(default_factory=lambda: dict(STANDARD_LAYER))
    qkv_layout: str = "separate"
    layer_prefix: str = "model.layers.{i}."
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head.weight"
    free_head_dim: bool = True
    heads_divide_hidden: bool = False
    embed_scale: bool = False
    per_head_norm_field: str | None = None

    def name(self, layer_idx: int, role: str, kind: str) -> str:
        return f"{self.layer_prefix.format(i=layer_idx)}{self.layer_tensors[role]}.{kind}"


def _standard(model_type, **kwargs) -> GrowSpec:
    return GrowSpec(model_type, **{"norm": "rms", "eps_field": "rms_norm_eps", **kwargs})


GROW_FAMILIES = {
    spec.model_type: spec
    for spec in (
        _standard("llama", heads_divide_hidden=True),
        _standard("mistral"),
        _standard("qwen2"),
        _standard("gemma", norm="rms_one_plus", embed_scale=True),
        _standard(
            "phi3",
            free_head_dim=False,
            qkv_layout="blocks",
            layer_tensors={"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
                           "down": "mlp.down_proj", "attn_norm": "input_layernorm",
                           "mlp_norm": "post_attention_layernorm"},
        ),
        GrowSpec("stablelm", norm="layer", eps_field="layer_norm_eps", free_head_dim=False,
                 per_head_norm_field="qk_layernorm"),
        GrowSpec(
            "gpt_neox",
            norm="layer",
            eps_field="layer_norm_eps",
            free_head_dim=False,
            heads_divide_hidden=True,
            qkv_layout="per_head",
            layer_prefix="gpt_neox.layers.{i}.",
            embed="gpt_neox.embed_in.weight",
            final_norm="gpt_neox.final_layer_norm",
            lm_head="embed_out.weight",
            layer_tensors={"qkv": "attention.query_key_value", "o": "attention.dense", "up": "mlp.dense_h_to_4h",
                           "down": "mlp.dense_4h_to_h", "attn_norm": "input_layernorm",
                           "mlp_norm": "post_attention_layernorm"},
        ),
    )
}


def grow_spec_for(model_type: str) -> GrowSpec:
    if model_type not in GROW_FAMILIES:
        supported = ", ".join(sorted(GROW_FAMILIES))
        raise NetmorphError(
            f"unsupported architecture {model_type!r}: grow supports {supported}; grow a model of one of these families"
        )
    return GROW_FAMILIES[model_type]
