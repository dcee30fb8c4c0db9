"""The differential attention module takes the KV cache under every name transformers 5.x has used for it, and
refuses a cache under a name it does not know instead of decoding without it (transformers 5.24 renamed
`past_key_values` → `cache`; GPT-NeoX and Falcon layers say `layer_past`)."""

import pytest
import torch
from transformers import DynamicCache

from netmorph.modeling.modeling_netmorph_diff import CACHE_ARGUMENTS
from tests.helpers import convert, load, random_ids, save_tiny_model

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-arguments")
    save_tiny_model(root / "src", "llama")
    return load(convert(root / "src", root / "out").output_dir, "sdpa")


def decode_with(model, name: str) -> torch.Tensor:
    """Prefill 6 tokens through the first layer's attention, then decode one more, the cache passed as `name`."""
    attention = model.model.layers[0].self_attn
    hidden = model.model.embed_tokens(random_ids(batch=1, length=7))
    positions = torch.arange(7)[None]
    cos, sin = model.model.rotary_emb(hidden, positions)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        attention(hidden[:, :6], (cos[:, :6], sin[:, :6]), None, **{name: cache})
        assert cache.get_seq_length() == 6, f"{name}: the prefill did not reach the cache"
        out, _ = attention(hidden[:, 6:], (cos[:, 6:], sin[:, 6:]), None, **{name: cache})
        full, _ = attention(hidden, (cos, sin), None)
    assert (out[:, 0] - full[:, 6]).abs().max().item() <= 1e-6, f"{name}: decode step ≠ full forward"
    return out


def test_every_cache_spelling_reaches_the_cache_and_gives_the_same_step(model):
    steps = [decode_with(model, name) for name in CACHE_ARGUMENTS]
    assert all(torch.equal(step, steps[0]) for step in steps[1:])


@pytest.mark.parametrize("name", ["past_key_value", "kv_cache", "layer_cache"])
def test_an_unknown_cache_argument_raises_instead_of_being_dropped(model, name):
    attention = model.model.layers[0].self_attn
    hidden = torch.randn(1, 3, model.config.hidden_size)
    cos, sin = model.model.rotary_emb(hidden, torch.arange(3)[None])
    with pytest.raises(TypeError, match=f"unknown cache argument '{name}'"):
        attention(hidden, (cos, sin), None, **{name: DynamicCache(config=model.config)})


def test_a_cache_object_under_any_other_name_raises(model):
    attention = model.model.layers[0].self_attn
    hidden = torch.randn(1, 3, model.config.hidden_size)
    cos, sin = model.model.rotary_emb(hidden, torch.arange(3)[None])
    with pytest.raises(TypeError, match="unknown cache argument 'state'"):
        attention(hidden, (cos, sin), None, state=DynamicCache(config=model.config))


def test_two_different_caches_raise(model):
    attention = model.model.layers[0].self_attn
    hidden = torch.randn(1, 3, model.config.hidden_size)
    cos, sin = model.model.rotary_emb(hidden, torch.arange(3)[None])
    with pytest.raises(TypeError, match="two different KV caches"):
        attention(hidden, (cos, sin), None, cache=DynamicCache(config=model.config),
                  past_key_values=DynamicCache(config=model.config))
