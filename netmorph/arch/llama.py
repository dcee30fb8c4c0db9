"""Llama-family decoders: Llama, Mistral, Qwen2. Same tensor names, different biases and sliding windows."""

from dataclasses import dataclass

from netmorph.errors import NetmorphError


@dataclass(frozen=True)
class ArchSpec:
    """What netmorph needs to know about a family, as data.

    qkv_bias / o_bias: True, False, or the name of the config field that decides it.
    sliding: how the family marks sliding-window layers — "none", "all" (Mistral: every layer when
        `sliding_window` is set) or "layer_types" (Qwen2: the config's per-layer list).
    """

    model_type: str
    qkv_bias: bool | str
    o_bias: bool | str
    sliding: str
    layer_prefix: str = "model.layers.{i}."
    attention_prefix: str = "self_attn."

    def bias(self, config, which: str) -> bool:
        value = self.qkv_bias if which == "qkv" else self.o_bias
        return bool(getattr(config, value, False)) if isinstance(value, str) else value

    def layer_types(self, config) -> list[str]:
        n = config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        if self.sliding == "layer_types" and getattr(config, "layer_types", None):
            return list(config.layer_types)
        if self.sliding == "all" and window is not None:
            return ["sliding_attention"] * n
        return ["full_attention"] * n

    def attention_key(self, layer_idx: int, name: str) -> str:
        return f"{self.layer_prefix.format(i=layer_idx)}{self.attention_prefix}{name}"


FAMILIES = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama", qkv_bias="attention_bias", o_bias="attention_bias", sliding="none"),
        ArchSpec("mistral", qkv_bias=False, o_bias=False, sliding="all"),
        ArchSpec("qwen2", qkv_bias=True, o_bias=False, sliding="layer_types"),
    )
}


def spec_for(model_type: str) -> ArchSpec:
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise NetmorphError(
            f"unsupported architecture {model_type!r}: convert-diff-transformer supports {supported}; "
            "convert a model of one of these families"
        )
    return FAMILIES[model_type]
