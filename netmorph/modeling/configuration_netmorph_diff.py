"""Configurations of decoder-only LLMs whose attention is differential attention (Ye et al. 2024).

Self-contained (imports only transformers): netmorph copies this file next to every converted checkpoint so that
`AutoConfig.from_pretrained(dir, trust_remote_code=True)` works without netmorph installed.

Each family keeps its stock transformers config class, subclassed under model_type "netmorph_diff_<family>"
(`NetmorphDiffLlamaConfig`, `NetmorphDiffGPT2Config`, ...), so the stock modeling code reads every field it knows.
The differential fields are extra config attributes:

    diff_layout: "doubled" — q/k projections have twice the heads: heads [0, H) form the positive component and
        [H, 2H) the negative one; V and O keep their shapes (value dim d).
        "split" — the H query heads (and KV heads) are halved into positive and negative components, giving H/2
        differential heads whose value dim is 2d (the paper's and DiffLlama's layout).
        "v2" — DIFF V2: q_proj has 2H heads (pairs 2j, 2j + 1), K/V unchanged, λ = sigmoid(lambda_proj(x)) per token
        and head, no λ vectors, mix or sub-layer norm.
    sublayer_norm: per-head RMSNorm (with gain) on the differential output before o_proj, as in the paper.
    lambda_std: std of the normal init of the four λ vectors when a model is created from scratch.
    diff_attention: the attention features, per layer where they vary, written by the converter — see
        modeling_netmorph_diff.AttentionFeatures and install_differential_attention.
    source_model_type: the family.

The classes are built on first use (module `__getattr__`), so loading one checkpoint imports one family's
transformers config module, and a family that a future transformers drops does not break the others.
"""

import transformers

DIFF_LAYOUTS = ("doubled", "split", "v2")

# family (the source's model_type) → (stock config class name in transformers, our class name)
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", "NetmorphDiffLlamaConfig"),
    "mistral": ("MistralConfig", "NetmorphDiffMistralConfig"),
    "qwen2": ("Qwen2Config", "NetmorphDiffQwen2Config"),
    "qwen3": ("Qwen3Config", "NetmorphDiffQwen3Config"),
    "gemma": ("GemmaConfig", "NetmorphDiffGemmaConfig"),
    "gemma2": ("Gemma2Config", "NetmorphDiffGemma2Config"),
    "gemma3_text": ("Gemma3TextConfig", "NetmorphDiffGemma3TextConfig"),
    "phi3": ("Phi3Config", "NetmorphDiffPhi3Config"),
    "gpt_neox": ("GPTNeoXConfig", "NetmorphDiffGPTNeoXConfig"),
    "stablelm": ("StableLmConfig", "NetmorphDiffStableLmConfig"),
    "falcon": ("FalconConfig", "NetmorphDiffFalconConfig"),
    "gpt2": ("GPT2Config", "NetmorphDiffGPT2Config"),
    "olmo2": ("Olmo2Config", "NetmorphDiffOlmo2Config"),
    "mixtral": ("MixtralConfig", "NetmorphDiffMixtralConfig"),
    "qwen3_moe": ("Qwen3MoeConfig", "NetmorphDiffQwen3MoeConfig"),
    "gpt_oss": ("GptOssConfig", "NetmorphDiffGptOssConfig"),
    "smollm3": ("SmolLM3Config", "NetmorphDiffSmolLM3Config"),
    "granite": ("GraniteConfig", "NetmorphDiffGraniteConfig"),
    "olmo3": ("Olmo3Config", "NetmorphDiffOlmo3Config"),
    "ministral": ("MinistralConfig", "NetmorphDiffMinistralConfig"),
}
_BUILT: dict[str, type] = {}


def family_config_class(family: str) -> type:
    """`NetmorphDiff<Family>Config`: the stock config class of a family under model_type "netmorph_diff_<family>".

    Raises KeyError for a family not in FAMILY_CONFIGS."""
    stock_name, name = FAMILY_CONFIGS[family]
    if name not in _BUILT:
        attributes = {"model_type": f"netmorph_diff_{family}", "source_family": family,
                      "__module__": __name__, "__qualname__": name}
        _BUILT[name] = type(name, (getattr(transformers, stock_name),), attributes)
    return _BUILT[name]


def __getattr__(name: str):
    for family, (_, class_name) in FAMILY_CONFIGS.items():
        if class_name == name:
            return family_config_class(family)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
