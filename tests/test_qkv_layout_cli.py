"""`netmorph qkv-layout` end to end: tiny random models of the stock transformers classes saved to disk, converted
through the real CLI, loaded fresh. Where a stock class reads the result its logits must equal the original's
(fp32) with the same greedy tokens; every chain of conversions that comes back to the family's own layout must give
the source's tensors bit for bit."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
)

from netmorph.arch import FAMILIES
from netmorph.cli import main
from netmorph.ops.qkv_layout import Heads, same_bytes
from netmorph.surgery.qkv_layout import MARKER
from tests.grow_helpers import TINY as GROW_TINY
from tests.grow_helpers import save_tiny
from tests.helpers import random_ids, save_char_tokenizer, save_tiny_model

# Across families (Llama ↔ Phi-3) a fused matmul replaces three separate ones (and Phi-3's attention is its own code),
# so fp32 logits round differently. The exactness check runs in float64: max |Δlogit| ≤ FLOAT64_TOLERANCE (what
# float64 rounding leaves on these tiny models is ~1e-15). In fp32 the bound is measured, not assumed: twice the
# source model's own fp32 rounding error (max |fp32 − float64 logits| on the same tokens, ~4e-6 here, about 9 ulp of
# the largest logit) — each of the two models rounds about as much. Within one family a permutation comes back to
# the same bits, and there the fp32 logits must be identical (== 0.0).
FLOAT64_TOLERANCE = 1e-10
SMALL = dict(vocab_size=97, num_hidden_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def perturbed(model):
    """Non-trivial norm gains and biases, so a dropped or misplaced tensor shows in the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln" in name.split(".")[-2]:
                param.copy_(1.0 + 0.3 * torch.randn_like(param) if name.endswith("weight") else 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.3 * torch.randn_like(param))
    return model


def save_stock(directory: Path, model_class, config, seed: int = 0) -> Path:
    """A perturbed random model with a real tokenizer for its 97 tokens (the command verifies on real text)."""
    torch.manual_seed(seed)
    perturbed(model_class(config)).save_pretrained(directory)
    return save_char_tokenizer(directory)


def phi3_config(**overrides):
    return Phi3Config(**{**SMALL, "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "max_position_embeddings": 128, **overrides})


def falcon_config(**overrides):
    return FalconConfig(**{**SMALL, "hidden_size": 32, "num_attention_heads": 4, "alibi": False, **overrides})


STOCK_SOURCES = {
    "gpt_neox": lambda d: save_stock(d, GPTNeoXForCausalLM, GPTNeoXConfig(**SMALL, hidden_size=32, num_attention_heads=4,
                                                                         intermediate_size=48)),
    "falcon_gqa": lambda d: save_stock(d, FalconForCausalLM, falcon_config(new_decoder_architecture=True, num_kv_heads=2,
                                                                           bias=True)),
    "falcon_mqa": lambda d: save_stock(d, FalconForCausalLM, falcon_config(multi_query=True)),
    "falcon_mha": lambda d: save_stock(d, FalconForCausalLM, falcon_config(multi_query=False, bias=True)),
    "gpt2": lambda d: save_stock(d, GPT2LMHeadModel, GPT2Config(**SMALL, n_embd=32, n_head=4, n_positions=640)),
    "phi3_mqa": lambda d: save_stock(d, Phi3ForCausalLM, phi3_config(num_key_value_heads=1)),
    "qwen2": lambda d: save_char_tokenizer(save_tiny_model(d, "qwen2")),
}


def qkv_layout(source: Path, output: Path, target: str, *flags: str) -> str:
    result = CliRunner().invoke(main, ["qkv-layout", str(source), "--to", target, "-o", str(output), *flags],
                                prog_name="netmorph", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def refusal(*args: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], prog_name="netmorph", catch_exceptions=False)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def load(path: Path, dtype=torch.float32):
    from netmorph.pipeline import experts_runnable_in

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager").eval()
    experts_runnable_in(model, dtype)  # MoE families: the experts' eager loop in float64
    return model


@torch.no_grad()
def compare(original: Path, converted: Path) -> float:
    """fp32 max |Δlogit| over two 24-token rows (past Mistral's 7-token window), after asserting equal greedy tokens
    and float64 logits equal to FLOAT64_TOLERANCE."""
    a, b = load(original), load(converted)
    ids = random_ids()
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(a.generate(ids, **greedy), b.generate(ids, **greedy))
    exact = (load(original, torch.float64)(ids, use_cache=False).logits
             - load(converted, torch.float64)(ids, use_cache=False).logits).abs().max().item()
    assert exact <= FLOAT64_TOLERANCE, f"float64 max |Δlogit| {exact:.3e}: the conversion is not exact"
    return (a(ids, use_cache=False).logits - b(ids, use_cache=False).logits).abs().max().item()


@torch.no_grad()
def cross_family_tolerance(original: Path, ids: torch.Tensor | None = None) -> float:
    """Twice the source model's own fp32 rounding error on `ids`: max |fp32 − float64 logits|."""
    ids = random_ids() if ids is None else ids
    rounding = (load(original)(ids, use_cache=False).logits.double()
                - load(original, torch.float64)(ids, use_cache=False).logits).abs().max().item()
    return 2 * rounding


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def assert_same_tensors(a: Path, b: Path) -> None:
    first, second = tensors(a), tensors(b)
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name].dtype == second[name].dtype and torch.equal(first[name], second[name]), name


def marker(directory: Path):
    return json.loads((directory / "config.json").read_text()).get(MARKER)


# ── stock ↔ stock across families: Llama / Mistral ↔ Phi-3 ──

@pytest.mark.parametrize("family, overrides", [
    ("llama", dict(attention_bias=False, head_dim=4)),  # GQA 9 / 3
    ("mistral", dict(head_dim=4, num_key_value_heads=1)),  # MQA, sliding window 7
], ids=["llama-gqa", "mistral-mqa-sliding"])
def test_llama_family_to_sequential_is_a_stock_phi3_and_back(tmp_path, family, overrides):
    source = save_tiny_model(tmp_path / "src", family, **overrides)
    output = qkv_layout(source, tmp_path / "phi3", "sequential", "--no-verify")
    assert "stock phi3" in output
    phi3 = json.loads((tmp_path / "phi3" / "config.json").read_text())
    assert phi3["model_type"] == "phi3" and MARKER not in phi3
    assert phi3["sliding_window"] == (7 if family == "mistral" else None)
    assert compare(source, tmp_path / "phi3") <= cross_family_tolerance(source)
    qkv_layout(tmp_path / "phi3", tmp_path / "back", "separate", "--no-verify")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == family
    assert_same_tensors(source, tmp_path / "back")
    assert compare(source, tmp_path / "back") == 0.0


def test_phi3_to_separate_is_a_stock_llama_verified_on_real_text(tmp_path):
    """The command's own verification: real text through both stock classes, logits and greedy generation."""
    source = save_stock(tmp_path / "src", Phi3ForCausalLM, phi3_config())
    output = qkv_layout(source, tmp_path / "llama", "separate")
    assert "stock llama" in output and "PASS" in output and "Generations match" in output
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["model_type"] == "llama"
    assert "q_proj" in (tmp_path / "llama" / "README.md").read_text()
    assert compare(source, tmp_path / "llama") <= cross_family_tolerance(source)


def test_verified_layer_by_layer_when_two_copies_do_not_fit(tmp_path, monkeypatch):
    """Short of memory for two fp32 models, the command verifies one decoder layer of each at a time."""
    import netmorph.surgery.qkv_layout as command
    import netmorph.verify.layerwise
    from netmorph.verify.layerwise import LayerwiseReport

    source = save_char_tokenizer(save_tiny_model(tmp_path / "src", "llama", attention_bias=False, head_dim=4))
    monkeypatch.setattr(netmorph.verify.layerwise, "whole_models_fit", lambda reader, converted_elements=None: False)
    result = command.convert_qkv_layout(str(source), tmp_path / "phi3", command.QkvLayoutOptions.build(to="sequential"))
    [report] = result.reports
    assert isinstance(report, LayerwiseReport) and report.passed
    assert len(report.layers) == 2 + 2 and report.max_abs_logit_diff <= cross_family_tolerance(source)
    assert "layer-wise" in (tmp_path / "phi3" / "README.md").read_text()


def test_phi3_with_partial_rotary_refuses_the_llama_target(tmp_path):
    source = save_stock(tmp_path / "src", Phi3ForCausalLM,
                        phi3_config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 0.5}))
    line = refusal("qkv-layout", source, "--to", "separate", "-o", tmp_path / "out")
    assert "partial_rotary_factor 0.5" in line and "--allow-non-stock" in line
    assert not (tmp_path / "out").exists()
    qkv_layout(source, tmp_path / "separate", "separate", "--allow-non-stock", "--no-verify")
    assert marker(tmp_path / "separate") == "separate"
    qkv_layout(tmp_path / "separate", tmp_path / "back", "sequential", "--no-verify")
    assert_same_tensors(source, tmp_path / "back")
    assert compare(source, tmp_path / "back") == 0.0


# ── fused families: through every other layout and back to a stock-loadable checkpoint ──

ROUND_TRIPS = {
    # legacy interleaved → sequential (litgpt's upgrade), then the other layouts, back to interleaved
    "gpt_neox": ("sequential", "separate", "grouped"),
    "falcon_gqa": ("sequential", "separate", "grouped"),
    "falcon_mha": ("sequential", "separate", "interleaved"),
    "falcon_mqa": ("separate", "grouped"),
    "gpt2": ("separate", "interleaved", "sequential"),
    "phi3_mqa": ("grouped", "separate", "sequential"),
    "qwen2": ("sequential", "grouped", "separate"),
}


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_round_trip_through_other_layouts_is_bit_exact(tmp_path, name):
    source = STOCK_SOURCES[name](tmp_path / "src")
    current = source
    for step, target in enumerate(ROUND_TRIPS[name]):
        nxt = tmp_path / f"{step}-{target}"
        qkv_layout(current, nxt, target, "--allow-non-stock")  # verify on: reads back every tensor it rearranged
        current = nxt
    assert marker(current) is None  # back in the family's own layout: a plain stock checkpoint
    assert_same_tensors(source, current)
    assert compare(source, current) == 0.0


def test_non_stock_layout_is_named_for_its_layout_and_refused_elsewhere(tmp_path):
    """A stock class never mistakes a rearranged tensor for its own: the name says the layout. netmorph's other
    commands refuse the checkpoint with the command that converts it back."""
    source = STOCK_SOURCES["gpt_neox"](tmp_path / "src")
    line = refusal("qkv-layout", source, "--to", "sequential", "-o", tmp_path / "out")
    assert line == ("error: no stock transformers class reads a gpt_neox model in the sequential layout: pass "
                    f"--allow-non-stock to write it anyway (config.json records {MARKER}; `--to interleaved` "
                    "converts it back)")
    out = tmp_path / "seq"
    qkv_layout(source, out, "sequential", "--allow-non-stock")
    names = tensors(out)
    assert "gpt_neox.layers.0.attention.qkv_sequential.weight" in names
    assert not any(n.endswith("query_key_value.weight") for n in names)
    assert marker(out) == "sequential" and "No stock transformers class reads" in (out / "README.md").read_text()
    _, info = GPTNeoXForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert "gpt_neox.layers.0.attention.query_key_value.weight" in info["missing_keys"]  # reported, not misread
    expected = (f"error: {out} holds its q/k/v weights in the sequential layout ({MARKER} in config.json), which no "
                f"stock gpt_neox class reads: convert it back first with `netmorph qkv-layout {out} --to interleaved "
                "-o DIR`")
    assert refusal("verify", source, out) == expected
    assert refusal("grow", out, "-o", tmp_path / "grown", "--num-layers", "3") == expected
    # grouped with one KV head per query head is the interleaved layout byte for byte: a stock checkpoint
    qkv_layout(source, tmp_path / "grouped", "grouped")
    assert marker(tmp_path / "grouped") is None
    assert_same_tensors(source, tmp_path / "grouped")


def test_interleaved_is_refused_for_shared_kv_heads(tmp_path):
    source = save_tiny_model(tmp_path / "src", "llama")  # 9 query / 3 KV heads
    line = refusal("qkv-layout", source, "--to", "interleaved", "-o", tmp_path / "out", "--allow-non-stock")
    assert line == ("error: the interleaved layout needs as many key/value heads as query heads, but this model has "
                    "9 query and 3 key/value heads (GQA): use --to grouped, which stores the same per-group order for "
                    "shared key/value heads")
    assert not (tmp_path / "out").exists()


def test_streams_sharded_input_to_sharded_output(tmp_path):
    """Sharded in, sharded out with an index; untouched tensors are byte-identical; nothing partial is left."""
    source = save_char_tokenizer(save_tiny_model(tmp_path / "src", "llama", attention_bias=False, head_dim=4))
    sharded = tmp_path / "sharded"
    qkv_layout(source, sharded, "separate", "--max-shard-size", "20KB", "--no-verify")  # a no-op rewrite, sharded
    assert len(list(sharded.glob("model-*.safetensors"))) > 2 and (sharded / "model.safetensors.index.json").exists()
    out = tmp_path / "phi3"
    qkv_layout(sharded, out, "sequential", "--max-shard-size", "20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "model.layers.1.self_attn.qkv_proj.weight" in index["weight_map"]
    before, after = tensors(source), tensors(out)
    untouched = [n for n in before if "self_attn.q_proj" not in n and "self_attn.k_proj" not in n
                 and "self_attn.v_proj" not in n and "gate_proj" not in n and "up_proj" not in n]
    assert untouched and all(torch.equal(before[n], after[n]) for n in untouched)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def random_family_model(directory: Path, family: str, kv_heads: int, per_group: int, head_dim: int, bias: bool):
    """A stock model of `family` with these head counts (GPT-NeoX and GPT-2 have one KV head per query head)."""
    heads = kv_heads * per_group
    if family in ("gpt_neox", "gpt2"):
        kv_heads = heads
    hidden = heads * head_dim
    if family == "falcon":
        return save_stock(directory, FalconForCausalLM, falcon_config(
            new_decoder_architecture=True, num_attention_heads=heads, num_kv_heads=kv_heads, hidden_size=hidden,
            bias=bias))
    if family == "gpt_neox":
        return save_stock(directory, GPTNeoXForCausalLM, GPTNeoXConfig(
            **SMALL, hidden_size=hidden, num_attention_heads=heads, intermediate_size=48, attention_bias=bias))
    if family == "gpt2":
        return save_stock(directory, GPT2LMHeadModel, GPT2Config(**SMALL, n_embd=hidden, n_head=heads, n_positions=640))
    if family == "phi3":
        return save_stock(directory, Phi3ForCausalLM, phi3_config(hidden_size=hidden, num_attention_heads=heads,
                                                                  num_key_value_heads=kv_heads))
    overrides = {"attention_bias": bias} if family == "llama" else {}
    return save_char_tokenizer(save_tiny_model(directory, family, num_attention_heads=heads,
                                               num_key_value_heads=kv_heads, head_dim=head_dim, **overrides))


FAMILY_LAYOUT = {"falcon": "grouped", "gpt_neox": "interleaved", "gpt2": "sequential", "phi3": "sequential",
                 "llama": "separate", "qwen2": "separate"}


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(family=st.sampled_from(sorted(FAMILY_LAYOUT)), kv_heads=st.integers(1, 3), per_group=st.integers(1, 3),
       head_dim=st.sampled_from([4, 8]), bias=st.booleans(),
       chain=st.permutations(["sequential", "separate", "interleaved", "grouped"]))
def test_random_family_and_head_config_round_trips(tmp_path_factory, family, kv_heads, per_group, head_dim, bias,
                                                   chain):
    """A random family, random head counts (MHA / GQA / MQA), any order of target layouts (interleaved only when
    the heads allow it; Llama may pass through a stock Phi-3 and back), then the family's own layout: the source's
    tensors bit for bit and the same logits."""
    tmp = tmp_path_factory.mktemp(family)
    source = random_family_model(tmp / "src", family, kv_heads, per_group, head_dim, bias)
    config = load(source).config
    heads_equal = family in ("gpt_neox", "gpt2") or per_group == 1
    current = source
    for step, target in enumerate([t for t in chain if t != "interleaved" or heads_equal] + [FAMILY_LAYOUT[family]]):
        nxt = tmp / f"{step}-{target}"
        qkv_layout(current, nxt, target, "--allow-non-stock", "--no-verify")
        current = nxt
    assert marker(current) is None
    assert json.loads((current / "config.json").read_text())["model_type"] == config.model_type
    assert_same_tensors(source, current)
    assert compare(source, current) == 0.0


def test_gguf_source_to_a_stock_phi3(tmp_path):
    """A .gguf SOURCE (dequantized on load) → sequential: a stock Phi-3 checkpoint computing the GGUF model."""
    from netmorph.sources import resolve_source
    from tests.test_error_table import write_tiny_gguf

    (tmp_path / "gguf").mkdir()
    gguf = write_tiny_gguf(tmp_path / "gguf" / "tiny.gguf")
    qkv_layout(gguf, tmp_path / "phi3", "sequential", "--no-verify")
    original, converted = resolve_source(gguf).load_model("eager"), load(tmp_path / "phi3")
    assert type(converted).__name__ == "Phi3ForCausalLM"
    ids = random_ids(vocab_size=64)
    with torch.no_grad():
        a, b = original(ids, use_cache=False).logits, converted(ids, use_cache=False).logits
    assert (a - b).abs().max().item() <= 2 * (a.double() - original.double()(ids, use_cache=False).logits).abs().max().item()


def test_falcon_multi_query_is_already_sequential(tmp_path):
    """Falcon-7B's multi_query layout, view(…, H + 2, D) in `_split_heads`, is sequential = grouped with one KV
    head: --to sequential writes the stock checkpoint with the same bytes and no marker."""
    source = STOCK_SOURCES["falcon_mqa"](tmp_path / "src")
    output = qkv_layout(source, tmp_path / "sequential", "sequential")
    assert "the stock falcon layout" in output
    assert marker(tmp_path / "sequential") is None
    assert_same_tensors(source, tmp_path / "sequential")


@pytest.mark.parametrize("family", sorted(GROW_TINY))
def test_every_family_round_trips_through_the_other_layouts(tmp_path, family):
    """Every family of the spec table (its tiny grow model: biases, qk norms, post-norms, sliding windows, partial
    rotary, Falcon variants), through every other layout its heads allow, back to its own: same bits, same logits."""
    source = save_tiny(tmp_path / "src", family)
    config = load(source).config
    spec = FAMILIES[config.model_type]
    heads = Heads(config.num_attention_heads, spec.num_kv_heads(config))
    others = [t for t in ("sequential", "grouped", "separate", "interleaved")
              if not same_bytes(t, spec.qkv_layout, heads) and t != spec.qkv_layout
              and (t != "interleaved" or heads.num_kv_heads == heads.num_heads)]
    current = source
    for step, target in enumerate([*others, spec.qkv_layout]):
        current, previous = tmp_path / f"{step}-{target}", current
        qkv_layout(previous, current, target, "--allow-non-stock", "--no-verify")
    assert marker(current) is None and others  # Falcon multi_query: only separate differs from its layout
    assert json.loads((current / "config.json").read_text())["model_type"] == config.model_type
    assert_same_tensors(source, current)
    assert compare(source, current) == 0.0


def test_a_failure_while_writing_leaves_nothing(tmp_path):
    """A damaged tensor found mid-stream (NaN in layer 1's k_proj, after layer 0 was written): one-line error, no
    output dir and no temp dir left beside it."""
    from safetensors.torch import save_file

    source = save_tiny_model(tmp_path / "src", "llama")
    state = load_file(source / "model.safetensors")
    state["model.layers.1.self_attn.k_proj.weight"][0, 0] = float("nan")
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    line = refusal("qkv-layout", source, "--to", "grouped", "--allow-non-stock", "-o", tmp_path / "out" / "model")
    assert "model.layers.1.self_attn.k_proj.weight holds 1 NaN" in line
    assert not (tmp_path / "out").exists()


def test_a_family_outside_the_table_is_refused_with_the_covered_ones(tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    source = save_stock(tmp_path / "bloom", BloomForCausalLM, BloomConfig(**SMALL, hidden_size=16, n_head=2))
    line = refusal("qkv-layout", source, "--to", "sequential", "-o", tmp_path / "out")
    assert line.startswith("error: unsupported architecture 'bloom': qkv-layout supports falcon, gemma, gemma2, ")
    assert line.endswith("; convert a model of one of these families") and not (tmp_path / "out").exists()


def test_large_configurations_planned_on_meta_device():
    """Real large shapes, planned on meta tensors with no memory allocated: Llama-3-70B --to sequential is exactly
    the state dict of a stock Phi-3 of that size; Falcon-40B (grouped, 128 heads in 8 groups) --to sequential
    keeps every shape and names its fused tensor for the layout."""
    import psutil
    from transformers import LlamaConfig, LlamaForCausalLM

    from netmorph.io.reader import MetaReader, StateDictReader
    from netmorph.io.streaming import record_manifest
    from netmorph.surgery.qkv_layout import convert_tensors, plan_conversion
    from netmorph.sources import Source

    rss_before = psutil.Process().memory_info().rss
    llama = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    falcon = FalconConfig(hidden_size=8192, num_hidden_layers=60, num_attention_heads=128, num_kv_heads=8,
                          new_decoder_architecture=True, vocab_size=65024, alibi=False, bias=False)
    for config, model_class in ((llama, LlamaForCausalLM), (falcon, FalconForCausalLM)):
        with torch.device("meta"):
            state = model_class(config).to(torch.bfloat16).state_dict()
        reader = StateDictReader(dict(state))
        plan, target_config = plan_conversion(Source(Path("meta"), "hf", config), reader, "sequential", True)
        specs = record_manifest(lambda recorder: convert_tensors(MetaReader(reader), plan, recorder))  # noqa: B023
        if config is llama:
            with torch.device("meta"):
                expected = Phi3ForCausalLM(target_config).to(torch.bfloat16).state_dict()
            assert {s.name: (s.shape, s.dtype) for s in specs} == {k: (tuple(v.shape), v.dtype)
                                                                   for k, v in expected.items()}
        else:
            renamed = {k.replace("query_key_value", "qkv_sequential"): tuple(v.shape) for k, v in state.items()}
            assert {s.name: s.shape for s in specs} == renamed and not plan.stock
    assert psutil.Process().memory_info().rss - rss_before < 200 * 2**20, "memory was allocated"
