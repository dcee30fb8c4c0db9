"""`import netmorph.auto` registers netmorph's differential-attention classes with transformers' Auto classes, so a
converted checkpoint loads with `AutoModelForCausalLM.from_pretrained(dir)` and no `trust_remote_code`.

A module of its own so that `import netmorph` (and `netmorph --help`) stays free of torch and transformers.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from netmorph.modeling.modeling_netmorph_diff import FAMILY_MODELS, family_model_class


def register() -> None:
    """Register every family's `NetmorphDiff<Family>Config` and model class (idempotent)."""
    for family in FAMILY_MODELS:  # each family: its stock model, differential attention
        model_class = family_model_class(family)
        AutoConfig.register(model_class.config_class.model_type, model_class.config_class, exist_ok=True)
        AutoModelForCausalLM.register(model_class.config_class, model_class, exist_ok=True)


register()
