"""netmorph: change the architecture of a pretrained transformer LLM without losing what it learned."""

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    """`import netmorph` makes converted checkpoints load with the Auto classes without trust_remote_code."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from netmorph.modeling.configuration_netmorph_diff import NetmorphDiffConfig
    from netmorph.modeling.modeling_netmorph_diff import NetmorphDiffForCausalLM, NetmorphDiffModel

    AutoConfig.register(NetmorphDiffConfig.model_type, NetmorphDiffConfig, exist_ok=True)
    AutoModel.register(NetmorphDiffConfig, NetmorphDiffModel, exist_ok=True)
    AutoModelForCausalLM.register(NetmorphDiffConfig, NetmorphDiffForCausalLM, exist_ok=True)


_register_auto_classes()
