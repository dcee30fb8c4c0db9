"""The family table (netmorph/arch/families.py) against the stock transformers classes: every tensor a tiny stock
model of the family *saves* (the names netmorph reads; transformers v5 renames some on save, e.g. GPT-NeoX's
lm_head → embed_out) is named by the spec, every name the spec gives exists in some variant of the family, and the
config readings (biases, tied head, KV heads, qk norms, layouts) match what the model builds."""

import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from netmorph.arch import COMMANDS, FAMILIES, ROLE_SPACES, spec_for
from netmorph.arch.families import QKV_LAYOUTS
from netmorph.errors import NetmorphError
from netmorph.arch.layer_view import LayerView
from netmorph.io.reader import StateDictReader
from netmorph.ops.qkv_layout import Heads
from tests.grow_helpers import MODEL_TYPE, TINY, tiny_config

# Extra variants so every optional tensor of a family shows up somewhere.
VARIANTS = {
    "llama": [dict(attention_bias=True, mlp_bias=True)],
    "stablelm": [dict(qk_layernorm=True, use_qkv_bias=True)],
    "gpt_neox": [dict(attention_bias=False)],
    "falcon": [dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1)],
    "olmo2": [dict(attention_bias=True)],
    "qwen3_moe": [dict(mlp_only_layers=[0])],  # a dense MLP in layer 0
}
CASES = [(name, {}) for name in TINY] + [(name, v) for name, variants in VARIANTS.items() for v in variants]


def layer_roles(spec, state_dict, layer_idx=0):
    """role.kind of each tensor of a layer, or the raw suffix when the spec does not name it."""
    prefix = spec.layer_prefix.format(i=layer_idx)
    by_name = {f"{suffix}.{kind}": f"{role}.{kind}" for role, suffix in spec.tensors.items() for kind in ("weight", "bias")}
    return [by_name.get(k[len(prefix):], k[len(prefix):]) for k in state_dict if k.startswith(prefix)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(model, its tensors as saved to disk) per case."""
    built = {}
    for i, (name, overrides) in enumerate(CASES):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(name, **overrides))
        directory = tmp_path_factory.mktemp(f"family-{i}")
        model.save_pretrained(directory)
        built[(name, tuple(sorted(overrides)))] = (model, load_file(str(directory / "model.safetensors")))
    return built


def test_the_table_covers_every_issue_family():
    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                             "gpt_neox", "stablelm", "falcon", "gpt2", "olmo2", "mixtral", "qwen3_moe", "gpt_oss",
                             "smollm3", "granite", "olmo3", "ministral"}
    for spec in FAMILIES.values():
        assert spec.qkv_layout in QKV_LAYOUTS and spec.norm in ("rms", "rms_one_plus", "layer")
        assert set(spec.tensors) <= set(ROLE_SPACES), spec.model_type
        assert set(spec.transposed) <= set(spec.tensors)
    assert set(COMMANDS["grow"]) == set(FAMILIES)


@pytest.mark.parametrize("name, overrides", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_every_stock_tensor_is_named_by_the_spec(models, name, overrides):
    model, state = models[(name, tuple(sorted(overrides)))]
    config = model.config
    spec = FAMILIES[MODEL_TYPE.get(name, name)]
    assert config.model_type == spec.model_type
    roles = layer_roles(spec, state)
    unknown = [r for r in roles if r.split(".")[0] not in spec.tensors]
    if spec.has_qk_norm(config) and spec.model_type == "stablelm":  # per-head LayerNorms: self_attn.*_layernorm.norms.h
        unknown = [r for r in unknown if "_layernorm.norms." not in r]
    # mixture-of-experts blocks (router, experts) and GPT-OSS's sinks: named by the spec's patterns
    moe = [r for r in unknown if any(re.fullmatch(pattern, r) for pattern in spec.moe_tensors)]
    moe_layer = bool(spec.moe_tensors) and 0 not in spec.dense_layers(config)
    assert bool(moe) == moe_layer, (spec.model_type, unknown)
    assert any(re.fullmatch(pattern, r) for r in moe for pattern in spec.moe_writers) == moe_layer
    sinks = [r for r in unknown if spec.sinks and r == spec.attention_prefix + spec.sinks]
    assert bool(sinks) == bool(spec.sinks)
    unknown = [r for r in unknown if r not in moe and r not in sinks]
    assert not unknown, unknown
    layer_keys = {k for k in state if k.startswith(spec.layer_prefix.split("{")[0])}
    globals_ = set(state) - layer_keys
    expected = {spec.embed, f"{spec.final_norm}.weight"} | (set() if spec.is_tied(config) else {spec.lm_head}) | (
        {f"{spec.final_norm}.bias"} if spec.norm == "layer" else set()) | (
        {spec.position_embed} if spec.position_embed else set())
    assert globals_ == expected
    # config readings agree with what the model built
    assert spec.is_tied(config) == (model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    assert ("q.bias" in roles or "qkv.bias" in roles) == spec.bias(config, "qkv")
    assert ("o.bias" in roles) == spec.bias(config, "o")
    assert ("up.bias" in roles) == spec.bias(config, "mlp")
    assert any(r.startswith("q_norm") or "q_layernorm" in r for r in roles) == spec.has_qk_norm(config)
    # the layer, read through the family's LayerView, has the shapes the model's config implies, and stores back
    # to the same names and bits
    heads, kv = config.num_attention_heads, spec.num_kv_heads(config)
    head_dim = model.model.layers[0].self_attn.head_dim if hasattr(model, "model") and hasattr(
        model.model, "layers") else config.hidden_size // heads
    view = LayerView(spec, Heads(heads, kv), head_dim)
    prefix = spec.layer_prefix.format(i=0)
    layer, extras = view.read(StateDictReader(state), 0, names=[k for k in state if k.startswith(prefix)])
    assert layer["q.weight"].shape == (heads * head_dim, config.hidden_size)
    assert layer["k.weight"].shape == layer["v.weight"].shape == (kv * head_dim, config.hidden_size)
    assert layer["o.weight"].shape == (config.hidden_size, heads * head_dim)
    stored = view.store(layer, 0)
    assert set(stored) | {prefix + suffix for suffix in extras} == {k for k in state if k.startswith(prefix)}
    assert all(torch.equal(tensor, state[name]) for name, tensor in stored.items())


def test_optional_roles_appear_in_some_variant(models):
    """No dead names in the table: every role of every family is a real tensor in one of the tiny variants."""
    seen = {}
    for (name, _), (_, state) in models.items():
        spec = FAMILIES[MODEL_TYPE.get(name, name)]
        seen.setdefault(spec.model_type, set()).update(r.split(".")[0] for r in layer_roles(spec, state))
    for model_type, spec in FAMILIES.items():
        assert set(spec.tensors) <= seen[model_type], (model_type, set(spec.tensors) - seen[model_type])


def test_falcon_kv_heads_follow_its_flags(models):
    spec = FAMILIES["falcon"]
    assert spec.num_kv_heads(tiny_config("falcon")) == 1 and spec.kv_heads_rule(tiny_config("falcon")) == "one"
    assert spec.num_kv_heads(tiny_config("falcon_mha")) == 4 and spec.kv_heads_rule(tiny_config("falcon_mha")) == "heads"
    assert spec.num_kv_heads(tiny_config("falcon_grouped")) == 2
    assert spec.rope_kind(tiny_config("falcon_alibi")) == "alibi" and spec.rope_kind(tiny_config("falcon")) == "full"


@pytest.mark.parametrize("command, words", [
    (None, "netmorph knows falcon, gemma"),
    ("grow", "grow supports falcon, gemma, gemma2, gemma3_text, gpt2, gpt_neox, gpt_oss, granite, llama, ministral, "
             "mistral, mixtral, olmo2, olmo3, phi3, qwen2, qwen3, qwen3_moe, smollm3, stablelm; grow a model"),
    ("convert-diff-transformer", "convert-diff-transformer supports falcon, gemma, gemma2, gemma3_text, gpt2, gpt_neox, "
                                 "gpt_oss, granite, llama, ministral, mistral, mixtral, olmo2, olmo3, phi3, qwen2, "
                                 "qwen3, qwen3_moe, smollm3, stablelm; convert a model"),
])
def test_uncovered_family_lists_the_covered_ones(command, words):
    with pytest.raises(NetmorphError, match="unsupported architecture 'bloom'") as error:
        spec_for("bloom", command)
    assert words in str(error.value)


@pytest.mark.parametrize("name, overrides", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=7, max_window_layers=1, num_hidden_layers=3)),
    ("qwen3", dict(use_sliding_window=True, sliding_window=7, max_window_layers=1, num_hidden_layers=3)),
    ("gemma2", dict(num_hidden_layers=3)), ("gemma3_text", {}),
    ("mistral", dict(sliding_window=7)), ("mistral", dict(sliding_window=None)), ("phi3", dict(sliding_window=7)),
    ("llama", {}), ("olmo2", {}),
    ("mixtral", {}), ("qwen3_moe", dict(use_sliding_window=True, sliding_window=7)), ("gpt_oss", {}),
    ("smollm3", dict(use_sliding_window=True, sliding_window=7)), ("smollm3", dict(sliding_window=7)),  # NoPE layers
    ("olmo3", {}), ("ministral", {}), ("granite", {}),
])
def test_sliding_window_rule_matches_the_stock_layers(name, overrides):
    """ArchSpec.layer_types (what convert writes into the differential config) agrees with what each stock attention
    layer does: a layer slides iff its output at the last of 12 positions (window 7 or none) does not change when
    its input at position 0 changes (hooks perturb the input of that one layer)."""
    model = AutoModelForCausalLM.from_config(tiny_config(name, **overrides)).eval()
    spec = FAMILIES[model.config.model_type]
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    actual = []
    for layer in model.model.layers:
        outputs = []

        def perturb(module, args, kwargs):
            if len(outputs) == 1:  # the second run: position 0 of this layer's input moves
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                hidden = hidden.clone()
                hidden[:, 0] += 1.0
                if "hidden_states" in kwargs:
                    kwargs["hidden_states"] = hidden
                else:
                    args = (hidden, *args[1:])
            return args, kwargs

        handles = [layer.self_attn.register_forward_pre_hook(perturb, with_kwargs=True),
                   layer.self_attn.register_forward_hook(lambda module, args, output: outputs.append(output[0][:, -1]))]
        with torch.no_grad():
            model(ids, use_cache=False)
            model(ids, use_cache=False)
        for handle in handles:
            handle.remove()
        actual.append("full_attention" if not torch.equal(outputs[0], outputs[1]) else "sliding_attention")
    assert spec.layer_types(model.config) == actual
    if name in ("qwen2", "gemma2", "gpt_oss", "olmo3", "ministral") or (name, overrides) == (
            "smollm3", dict(use_sliding_window=True, sliding_window=7)):
        assert set(actual) == {"sliding_attention", "full_attention"}  # the case is not trivial


@pytest.mark.parametrize("model_type, words", [
    ("deepseek_v3", "multi-head latent attention (MLA)"), ("qwen3_next", "Gated-DeltaNet linear attention"),
])
@pytest.mark.parametrize("command", ["convert-diff-transformer", "grow", "qkv-layout"])
def test_refused_families_say_why(model_type, words, command):
    with pytest.raises(NetmorphError, match=f"unsupported architecture '{model_type}'") as error:
        spec_for(model_type, command)
    assert words in str(error.value) and "\n" not in str(error.value)
