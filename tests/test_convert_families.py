"""convert-diff-transformer on every family beyond Llama/Mistral/Qwen2: a tiny random model of the stock transformers
class, converted in an exact mode by the real conversion code, loaded fresh from disk, computes the original's logits
(fp32, max |Δlogit| ≤ 1e-5) and the same greedy generation — with sliding windows shorter than the sequences and with
left padding. The converted model is the stock family model with differential attention (`NetmorphDiff<Family>...`).
"""

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from netmorph.errors import NetmorphError
from tests.family_models import VARIANTS, save_family_model
from tests.helpers import convert, random_ids

pytestmark = pytest.mark.compat  # also run against the oldest and newest transformers (tests/compat.py)

TOL = 1e-5  # fp32
BACKENDS = ("eager", "sdpa")


def load(path, backend):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation=backend,
                                                trust_remote_code=True).eval()


def stock_supports(path, backend) -> bool:
    """Gemma2's stock class refuses SDPA: compare only on the backends the original runs on."""
    try:
        load(path, backend)
    except ValueError:
        return False
    return True


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {variant: (save_family_model(root / variant, variant), convert(root / variant, root / f"{variant}-diff").output_dir)
            for variant in VARIANTS}


@torch.no_grad()
def logit_diffs(source, converted, backend) -> tuple[float, float]:
    """Max |Δlogit| on an unpadded batch and on a left-padded one (valid positions; row 0 has 6 padding tokens)."""
    original, model = load(source, backend), load(converted, backend)
    ids = random_ids(length=30)  # longer than the tiny sliding windows (7)
    full = (original(ids, use_cache=False).logits - model(ids, use_cache=False).logits).abs().max().item()
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    padded = (original(ids, attention_mask=mask, use_cache=False).logits
              - model(ids, attention_mask=mask, use_cache=False).logits)
    valid = mask.bool()[..., None].expand_as(padded)
    return full, padded[valid].abs().max().item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_conversion_matches_the_stock_model(conversions, variant):
    source, converted = conversions[variant]
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == f"netmorph_diff_{config['source_model_type']}"
    backends = [b for b in BACKENDS if stock_supports(source, b)]
    assert "eager" in backends
    for backend in backends:
        full, padded = logit_diffs(source, converted, backend)
        assert full <= TOL and padded <= TOL, (variant, backend, full, padded)
        original, model = load(source, backend), load(converted, backend)
        prompt = random_ids(batch=1, length=5, seed=3)
        with torch.no_grad():  # the KV cache path, beyond the sliding window
            expected = original.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
            generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
        assert torch.equal(expected, generated), (variant, backend)


@pytest.mark.parametrize("variant", ["gpt_neox", "falcon", "gpt2", "phi3", "mixtral"])
def test_fused_qkv_is_stored_unfused_and_the_negative_branch_is_live(conversions, variant, tmp_path):
    """Fused projections become q_proj/k_proj/v_proj/o_proj (nn.Linear layout); switching λ on changes the function,
    so the negative component is wired in; the mix survives save_pretrained + reload (Mixtral: transformers fuses
    its per-expert tensors on load and splits them again on save, through the stock conversions the modeling file
    registers)."""
    source, converted = conversions[variant]
    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert not any("query_key_value" in n or "c_attn" in n or "qkv_proj" in n for n in names)
    assert any(n.endswith("q_proj.weight") for n in names)
    model = load(converted, "eager")
    modules = [m for m in model.modules() if hasattr(m, "lambda_full")]
    assert len(modules) == model.config.num_hidden_layers
    ids = random_ids(length=16)
    with torch.no_grad():
        before = model(ids).logits
        for module in modules:
            module.mix.fill_(1.0)
        after = model(ids).logits
    assert (before - after).abs().max().item() > 1e-3
    model.save_pretrained(tmp_path / "resaved")
    with torch.no_grad():
        reloaded = load(tmp_path / "resaved", "eager")(ids).logits
    assert torch.equal(reloaded, after)


@pytest.mark.parametrize("variant", ["gemma2", "gpt2"])
def test_positive_branch_map_is_the_stock_attention(conversions, variant):
    """The attention plot / training monitor read `branch_probabilities`: at conversion its positive map is exactly
    the stock model's attention (Gemma2: soft-capped scores, sliding layer 0; GPT-2: no rotary, layer-scaled)."""
    from netmorph.plot import attention_maps

    source, converted = conversions[variant]
    original, model = load(source, "eager"), load(converted, "eager")
    ids = random_ids(batch=1, length=12)
    with torch.no_grad():
        stock = original(ids, output_attentions=True).attentions
    for layer in range(model.config.num_hidden_layers):
        positive, _, lam = attention_maps(model, ids, layer)
        assert lam == 0.0
        torch.testing.assert_close(positive, stock[layer][0], rtol=0, atol=1e-6)


def test_remote_code_is_self_contained_for_every_family(conversions, tmp_path):
    """A fresh process where `import netmorph` fails loads every family's conversion with trust_remote_code alone
    and reproduces the stock model's logits."""
    pairs = {variant: (str(source), str(converted)) for variant, (source, converted) in conversions.items()}
    script = textwrap.dedent(f"""
        import sys
        sys.modules["netmorph"] = None  # any import of netmorph now raises ImportError
        sys.modules["triton"] = None  # nor is Triton needed (the fused split-heads kernel is optional)
        import torch
        from transformers import AutoModelForCausalLM
        ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(0))
        for variant, (source, converted) in {pairs!r}.items():
            model = AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True, dtype=torch.float32)
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="eager")
            model.set_attn_implementation("eager")
            with torch.no_grad():
                diff = (original(ids).logits - model(ids).logits).abs().max().item()
            print("MAXDIFF", variant, diff)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf-home"),
                                 "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    assert result.returncode == 0, result.stderr[-3000:]
    diffs = {line.split()[1]: float(line.split()[2]) for line in result.stdout.splitlines() if line.startswith("MAXDIFF")}
    assert set(diffs) == set(VARIANTS)
    assert max(diffs.values()) <= TOL, diffs


def test_split_heads_on_a_fused_family_is_approximate_and_backend_consistent(tmp_path):
    source = save_family_model(tmp_path / "src", "gpt_neox")
    converted = convert(source, tmp_path / "out", split_heads=True).output_dir
    ids = random_ids(length=16)
    with torch.no_grad():
        eager, sdpa = load(converted, "eager")(ids).logits, load(converted, "sdpa")(ids).logits
        original = load(source, "eager")(ids).logits
    assert (eager - sdpa).abs().max().item() <= TOL
    assert 0 < (original - eager).abs().max().item() < float("inf")


def test_alibi_falcon_is_refused(tmp_path):
    source = save_family_model(tmp_path / "src", "falcon-mha", alibi=True)
    with pytest.raises(NetmorphError, match="ALiBi"):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variant", VARIANTS)
def test_layerwise_verification_equals_full_verification(tmp_path, variant):
    """Layer-wise verification runs each family's own forward one loaded layer at a time: its end-to-end figures are
    the full verify's, on the family's backend, for an exact conversion (passes) and for the approximate split-heads
    one (real per-layer differences, which it locates)."""
    from netmorph.sources import default_texts
    from netmorph.verify.compare import compare_models, load_pair
    from netmorph.verify.layerwise import compare_layerwise
    from tests.helpers import save_char_tokenizer

    source = save_char_tokenizer(save_family_model(tmp_path / "src", variant))
    backend = "sdpa" if stock_supports(source, "sdpa") else "eager"
    texts = default_texts()
    if variant in ("mixtral", "qwen3_moe"):  # stored per-expert tensors, fused by transformers on load
        with pytest.raises(NetmorphError, match="fuses its per-expert tensors"):
            convert(source, tmp_path / "refused", verify=True, verify_mode="layerwise")
        assert not (tmp_path / "refused").exists()
        return
    for mode, options in (("default", {}), ("split", {"split_heads": True})):
        if mode == "split" and variant == "falcon-mqa":
            continue  # one KV head: split heads is refused
        convert(source, tmp_path / mode, **options)
        layerwise = compare_layerwise(source, tmp_path / mode, texts, max_tokens=40, attn_implementation=backend,
                                      trust_remote_code=True)
        full = compare_models(*load_pair(str(source), str(tmp_path / mode), attn_implementation=backend,
                                         trust_remote_code=True), texts, prompts=(), max_tokens=40)
        for a, b in zip(layerwise.texts, full.texts, strict=True):
            assert a.tokens == b.tokens == 40
            for figure in ("max_abs_logit_diff", "loss_original", "loss_converted"):
                assert getattr(a, figure) == pytest.approx(getattr(b, figure), rel=1e-4, abs=1e-5), (mode, figure)
        assert len(layerwise.layers) == 2 + 2  # embedding, 2 layers, norm + lm_head
        assert layerwise.layers[0].same_input_max_abs_diff == 0.0  # the same embedding
        if mode == "default":
            assert layerwise.passed, layerwise.table()
        else:
            assert layerwise.layers[1].same_input_max_abs_diff > 1e-3, layerwise.table()


# ── property test: random configs per family ──

def _rotary_factor(draw, head_dim):
    """A partial-rotary fraction that leaves an even number of rotated dims."""
    return draw(st.sampled_from([f for f in (0.25, 0.5, 1.0) if int(head_dim * f) % 2 == 0 and int(head_dim * f)]))


@st.composite
def family_configs(draw):
    variant = draw(st.sampled_from(sorted(VARIANTS)))
    kv_heads, groups = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    heads = kv_heads * groups
    head_dim = draw(st.sampled_from([4, 8]))
    layers = draw(st.integers(1, 3))
    free = dict(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                hidden_size=heads * draw(st.integers(1, 3)) * 2)
    derived = dict(num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=heads * head_dim)
    moe = dict(free, hidden_size=4 * free["hidden_size"])
    overrides = {
        "qwen3": free, "gemma": free, "olmo2": free,
        "gemma2": dict(free, attn_logit_softcapping=draw(st.sampled_from([None, 3.0])),
                       query_pre_attn_scalar=draw(st.integers(4, 16))),
        "gemma3_text": dict(free, query_pre_attn_scalar=draw(st.integers(4, 16))),
        "phi3": dict(derived, partial_rotary_factor=_rotary_factor(draw, head_dim)),
        "gpt_neox": dict(num_attention_heads=heads, hidden_size=heads * 8, rotary_pct=_rotary_factor(draw, 8),
                         use_parallel_residual=draw(st.booleans()), attention_bias=draw(st.booleans())),
        "stablelm": dict(num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=heads * 8,
                         partial_rotary_factor=_rotary_factor(draw, 8), qk_layernorm=draw(st.booleans()),
                         use_parallel_residual=draw(st.booleans()), use_qkv_bias=draw(st.booleans())),
        # new_decoder_architecture: the stock class only runs with parallel attention; one or two pre-norms
        "falcon": dict(num_attention_heads=heads, num_kv_heads=kv_heads, hidden_size=heads * 8,
                       num_ln_in_parallel_attn=draw(st.sampled_from([1, 2]))),
        "falcon-mqa": dict(num_attention_heads=heads, hidden_size=heads * 8, parallel_attn=draw(st.booleans())),
        "falcon-mha": dict(num_attention_heads=heads, hidden_size=heads * 8, bias=draw(st.booleans())),
        "gpt2": dict(n_head=heads, n_embd=heads * 8, n_layer=layers,
                     scale_attn_by_inverse_layer_idx=draw(st.booleans())),
        # the stock experts' grouped matmul needs 16-byte strides: hidden a multiple of 4 in fp32
        "mixtral": moe, "gpt_oss": moe, "qwen3_moe": dict(moe, mlp_only_layers=draw(st.sampled_from([[], [0]]))),
        "ministral": free,
        "smollm3": dict(derived, no_rope_layer_interval=draw(st.integers(1, 3))),
        "granite": dict(derived, attention_multiplier=draw(st.sampled_from([0.05, 0.3, 1.0]))),
        "olmo3": derived,
    }[variant]
    if variant != "gpt2":
        overrides["num_hidden_layers"] = layers
    if "layer_types" in VARIANTS[variant][1]:
        overrides["layer_types"] = [draw(st.sampled_from(["sliding_attention", "full_attention"])) for _ in range(layers)]
    if variant in ("gemma", "gemma2", "gemma3_text", "qwen3", "olmo2", "olmo3", "ministral", "smollm3", "granite"):
        overrides["tie_word_embeddings"] = draw(st.booleans())
    mode = draw(st.sampled_from([{}, {"negative_init": "zero"}, {"negative_init": "mirror"}, {"lambda_start": "zero"}]))
    return variant, overrides, mode, draw(st.integers(0, 2**16)), draw(st.integers(1, 20))


@settings(max_examples=36, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family_configs())
@example(("gemma3_text", dict(num_attention_heads=1, num_key_value_heads=1, head_dim=8, hidden_size=2,
                              query_pre_attn_scalar=4, num_hidden_layers=3, layer_types=["sliding_attention"] * 3,
                              tie_word_embeddings=False), {}, 121, 3))
@example(("gemma2", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=4, hidden_size=32,
                         attn_logit_softcapping=None, query_pre_attn_scalar=4, num_hidden_layers=2,
                         layer_types=["sliding_attention"] * 2, tie_word_embeddings=False), {}, 0, 10))
def test_random_family_configs_convert_exactly(params):
    variant, overrides, mode, seed, length = params
    with tempfile.TemporaryDirectory() as tmp:
        source = save_family_model(Path(tmp) / "src", variant, seed=seed, **overrides)
        convert(source, Path(tmp) / "out", seed=seed, **mode)
        ids = random_ids(length=length, seed=seed)
        original, converted = load(source, "eager"), load(Path(tmp) / "out", "eager")
        with torch.no_grad():
            expected = original(ids, use_cache=False).logits
            diff = (expected - converted(ids, use_cache=False).logits).abs().max().item()
        # fp32 rounding, relative to the logits' size: the converted q projection is a wider matmul (other BLAS
        # blocking, an ulp here and there) that the layers after it carry on; seen up to 1.6e-5 on logits of ±1.6
        # and 1.0e-5 on Gemma2's. Bound: 128 ulp of the largest |logit| (a dropped bias or norm moves them by > 1e-2).
        tolerance = 128 * torch.finfo(torch.float32).eps * max(1.0, expected.abs().max().item())
        assert diff <= tolerance, (variant, overrides, mode, diff, tolerance)


@pytest.mark.parametrize("variant", ["gemma2", "falcon"])
def test_built_in_verification_passes_on_real_text(tmp_path, variant):
    """The converter's own verification (real text, greedy generation) on a stock family model, on the family's
    attention backend (Gemma2's stock class has no SDPA path)."""
    from tests.helpers import save_char_tokenizer

    source = save_char_tokenizer(save_family_model(tmp_path / "src", variant))
    result = convert(source, tmp_path / "out", verify=True)
    report = result.reports[0]
    assert report.max_abs_logit_diff <= TOL and report.generations_match, report.table()
