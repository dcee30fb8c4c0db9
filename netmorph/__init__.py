"""netmorph: change the architecture of a pretrained transformer LLM without losing what it learned."""

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# The module that defines AutoModel / AutoModelForCausalLM: nothing can look a model class up before it exists.
_AUTO_MODELS = "transformers.models.auto.modeling_auto"


def _register_auto_config() -> None:
    """Converted checkpoints load with the Auto classes without trust_remote_code once netmorph is imported:
    the config class at once (cheap), the model classes with transformers' Auto model module (below)."""
    from transformers import AutoConfig

    from netmorph.modeling.configuration_netmorph_diff import NetmorphDiffConfig

    AutoConfig.register(NetmorphDiffConfig.model_type, NetmorphDiffConfig, exist_ok=True)


def _register_auto_classes() -> None:
    from transformers import AutoModel, AutoModelForCausalLM

    from netmorph.modeling.configuration_netmorph_diff import NetmorphDiffConfig
    from netmorph.modeling.modeling_netmorph_diff import NetmorphDiffForCausalLM, NetmorphDiffModel

    AutoModel.register(NetmorphDiffConfig, NetmorphDiffModel, exist_ok=True)
    AutoModelForCausalLM.register(NetmorphDiffConfig, NetmorphDiffForCausalLM, exist_ok=True)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Registers the Auto classes the moment transformers' Auto model module has been imported, by anyone.

    The differential model's module imports transformers' whole modeling stack (~1.5 s); registering at
    `import netmorph` would make every command pay for it, also those that never build a model (a conversion
    with --no-verify). Any Auto model lookup needs `_AUTO_MODELS` first, so registering right after it loads is
    as good as registering at import."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _AUTO_MODELS:
            return None
        sys.meta_path.remove(self)  # once; and the lookup below must not find this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register_auto_classes()

    def __getattr__(self, name):  # get_source, get_code, is_package ...: the real loader's
        return getattr(self._loader, name)


def _install_registration() -> None:
    _register_auto_config()
    if _AUTO_MODELS in sys.modules:
        _register_auto_classes()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


_install_registration()
