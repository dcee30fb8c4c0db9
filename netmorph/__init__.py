"""netmorph: change the architecture of a pretrained transformer LLM without losing what it learned."""

__version__ = "0.2.0"


def _register_auto_classes() -> None:
    """`import netmorph` makes converted checkpoints load with the Auto classes without trust_remote_code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from netmorph.modeling.modeling_netmorph_diff import FAMILY_MODELS, family_model_class

    for family in FAMILY_MODELS:  # each family: its stock model, differential attention
        model_class = family_model_class(family)
        AutoConfig.register(model_class.config_class.model_type, model_class.config_class, exist_ok=True)
        AutoModelForCausalLM.register(model_class.config_class, model_class, exist_ok=True)


_register_auto_classes()
