import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import save_tiny_model  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The bundled SmolLM2-135M-Instruct, dequantized once to a Hugging Face safetensors directory (fp32)."""
    from netmorph.sources import resolve_source

    from transformers import LlamaForCausalLM

    source = resolve_source(None)
    directory = tmp_path_factory.mktemp("smollm2")
    gguf_model = source.load_model()
    config = gguf_model.config
    config.__dict__.pop("quantization_config", None)  # a GGUF-loaded model refuses save_pretrained (sources drops it too)
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.save_pretrained(directory)
    source.save_tokenizer(directory)
    source.save_generation_config(directory)
    return directory


@pytest.fixture
def tiny_llama(tmp_path):
    return save_tiny_model(tmp_path / "llama", "llama")
