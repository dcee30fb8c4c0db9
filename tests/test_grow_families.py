"""`grow` for every family of the table, every dimension each family grows: a tiny random float32 model of the
stock class, saved, grown through the real code path, loaded fresh from disk with the stock class (no remote
code), eager attention. Acceptance: max |Δlogit| ≤ 1e-5 in float32 and identical greedy generations.

Falcon appears in its four attention shapes (multi-query + parallel attention, grouped new_decoder_architecture,
classic MHA with biases, ALiBi). What a family cannot grow exactly is refused with the reason (second half).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from netmorph.arch import FAMILIES
from tests.grow_helpers import MODEL_TYPE, grow_tiny, save_tiny
from tests.test_cli_errors import assert_clean_error, run_cli

pytestmark = pytest.mark.compat  # also run against the oldest and newest transformers (tests/compat.py)

L, I, H, K, D, N = "num_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size"
# family → [(dims the case grows, options)]: together the cases of a family cover every dim it supports.
CASES = {
    "llama": [((L,), dict(num_layers=3, new_layers_at="0")), ((I,), dict(intermediate_size=64)),
              ((H, K), dict(num_attention_heads=12, num_key_value_heads=4)), ((K,), dict(num_key_value_heads=9)),
              ((D,), dict(head_dim=10)), ((N,), dict(hidden_size=45))],
    "mistral": [((L,), dict(num_layers=3)), ((I,), dict(intermediate_size=50)),
                ((H, K), dict(num_attention_heads=6, num_key_value_heads=3)), ((K,), dict(num_key_value_heads=4)),
                ((D,), dict(head_dim=14)), ((N,), dict(hidden_size=40))],
    "qwen2": [((L,), dict(num_layers=4, new_layers_at="interleave")), ((I,), dict(intermediate_size=60)),
              ((H, K), dict(num_attention_heads=9, num_key_value_heads=3)), ((K,), dict(num_key_value_heads=6)),
              ((D,), dict(head_dim=12)), ((N,), dict(hidden_size=48))],
    "qwen3": [((L,), dict(num_layers=3, new_layers_at="0")), ((I,), dict(intermediate_size=60)),
              ((H, K), dict(num_attention_heads=6, num_key_value_heads=3)), ((K,), dict(num_key_value_heads=4)),
              ((H,), dict(num_attention_heads=8)), ((N,), dict(hidden_size=64)),
              ((L, H, K, N), dict(num_layers=3, num_attention_heads=6, num_key_value_heads=3, hidden_size=96))],
    "gemma": [((L,), dict(num_layers=3)), ((I,), dict(intermediate_size=80)),
              ((H, K), dict(num_attention_heads=6, num_key_value_heads=3)), ((K,), dict(num_key_value_heads=4)),
              ((D,), dict(head_dim=24)), ((N,), dict(hidden_size=64))],
    "gemma2": [((L,), dict(num_layers=4, new_layers_at="interleave")), ((I,), dict(intermediate_size=80)),
               ((H, K), dict(num_attention_heads=6, num_key_value_heads=3)), ((K,), dict(num_key_value_heads=4)),
               ((D,), dict(head_dim=20)), ((D,), dict(head_dim=32)), ((N,), dict(hidden_size=64))],
    "gemma3_text": [((L,), dict(num_layers=4, new_layers_at="interleave")), ((I,), dict(intermediate_size=80)),
                    ((H, K), dict(num_attention_heads=6, num_key_value_heads=3)), ((K,), dict(num_key_value_heads=4)),
                    ((N,), dict(hidden_size=96)), ((I, N), dict(intermediate_size=80, hidden_size=144))],
    "olmo2": [((L,), dict(num_layers=4, new_layers_at="interleave")), ((I,), dict(intermediate_size=60)),
              ((K,), dict(num_key_value_heads=4))],
    "phi3": [((L,), dict(num_layers=3)), ((I,), dict(intermediate_size=80)),
             ((H, K, N), dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=72)),
             ((K,), dict(num_key_value_heads=4)), ((D, N), dict(head_dim=16, hidden_size=64))],
    "stablelm": [((L,), dict(num_layers=3)), ((I,), dict(intermediate_size=128)),
                 ((H, K, N), dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96)),
                 ((K,), dict(num_key_value_heads=4)), ((D, N), dict(head_dim=20, hidden_size=80))],
    "gpt_neox": [((L,), dict(num_layers=3)), ((I,), dict(intermediate_size=100)),
                 ((H, N), dict(num_attention_heads=6, hidden_size=96)), ((D, N), dict(head_dim=20, hidden_size=80))],
    "gpt2": [((L,), dict(num_layers=4, new_layers_at="interleave")), ((I,), dict(intermediate_size=60)),
             ((H, N), dict(num_attention_heads=6, hidden_size=48)), ((D, N), dict(head_dim=10, hidden_size=40))],
    "falcon": [((L,), dict(num_layers=3, new_layers_at="0")), ((I,), dict(intermediate_size=60)),
               ((H, N), dict(num_attention_heads=6, hidden_size=48)), ((D, N), dict(head_dim=12, hidden_size=48))],
    "falcon_grouped": [((L,), dict(num_layers=3)), ((I,), dict(intermediate_size=60)),
                       ((H, K, N), dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=48)),
                       ((K,), dict(num_key_value_heads=4)), ((D, N), dict(head_dim=12, hidden_size=48))],
    "falcon_mha": [((L,), dict(num_layers=4, new_layers_at="interleave")), ((I,), dict(intermediate_size=60)),
                   ((H, N), dict(num_attention_heads=6, hidden_size=48)), ((D, N), dict(head_dim=12, hidden_size=48))],
    "falcon_alibi": [((L,), dict(num_layers=3, new_layers_at="0")), ((I,), dict(intermediate_size=60))],
    # issue 21
    "mixtral": [((L,), dict(num_layers=3, new_layers_at="0")),
                ((H, K), dict(num_attention_heads=6, num_key_value_heads=3)), ((K,), dict(num_key_value_heads=4)),
                ((D,), dict(head_dim=16))],
    "qwen3_moe": [((L,), dict(num_layers=4, new_layers_at="interleave")),
                  ((H, K), dict(num_attention_heads=6, num_key_value_heads=3)), ((K,), dict(num_key_value_heads=4))],
    "gpt_oss": [((L,), dict(num_layers=3, new_layers_at="0")),
                ((H, K), dict(num_attention_heads=6, num_key_value_heads=3)), ((H,), dict(num_attention_heads=8)),
                ((K,), dict(num_key_value_heads=4))],
    "smollm3": [((L,), dict(num_layers=4, new_layers_at="interleave")), ((I,), dict(intermediate_size=64)),
                ((H, K, N), dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=48)),
                ((K,), dict(num_key_value_heads=4)), ((D, N), dict(head_dim=16, hidden_size=64))],
    "granite": [((L,), dict(num_layers=3)), ((I,), dict(intermediate_size=64)),
                ((H, K, N), dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=48)),
                ((K,), dict(num_key_value_heads=4)), ((D, N), dict(head_dim=16, hidden_size=64))],
    "olmo3": [((L,), dict(num_layers=4, new_layers_at="interleave")), ((I,), dict(intermediate_size=60)),
              ((K,), dict(num_key_value_heads=4))],
    "ministral": [((L,), dict(num_layers=4, new_layers_at="interleave")), ((I,), dict(intermediate_size=50)),
                  ((H, K), dict(num_attention_heads=6, num_key_value_heads=3)), ((K,), dict(num_key_value_heads=4)),
                  ((D,), dict(head_dim=14)), ((N,), dict(hidden_size=40))],
}
# What each family (variant) grows; everything else is refused (tested below).
SUPPORTED = {family: {dim for dims, _ in cases for dim in dims} for family, cases in CASES.items()}
PARAMS = [pytest.param(family, options, id=f"{family}-{'+'.join(dims)}") for family, cases in CASES.items()
          for dims, options in cases]
# Weight scales for float32 sources. A float32 forward pass carries its own rounding: each tiny source's float32
# logits differ from its float64 logits by up to ~1e-5 at the helpers' default scales (measured: StableLM 9.3e-6,
# Gemma 7.9e-6), i.e. exactly the tolerance; and with embeddings far off-centre (mean ≫ spread) a LayerNorm
# model's mean-filled dims amplify rounding through the tied head. These scales keep every source's own float32
# floor near 1e-6 so ≤ 1e-5 tests the recipe; the float64 suites (test_grow_tiny, test_grow_property) bound the
# recipe's own error far tighter. LayerNorm families keep an off-centre embedding so mean-fill is still exercised.
FP32_SCALE = {False: dict(initializer_range=0.1, embed_shift=0.0), True: dict(initializer_range=0.1, embed_shift=0.2)}
MEASURED: dict[str, float] = {}  # family → worst max |Δlogit| seen (printed at the end with -s)


def load32(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-sources")
    return {family: save_tiny(root / family, family, **FP32_SCALE[FAMILIES[MODEL_TYPE.get(family, family)].norm == "layer"])
            for family in CASES}


@pytest.fixture(scope="module", autouse=True)
def report_measurements():
    yield
    if MEASURED:
        print("\nmax |Δlogit| (float32) per family: "
              + ", ".join(f"{family} {value:.1e}" for family, value in MEASURED.items()))


@pytest.mark.parametrize("family, options", PARAMS)
def test_every_family_grows_every_supported_dim_exactly(sources, tmp_path, family, options):
    result = grow_tiny(sources[family], tmp_path / "grown", **options)
    original, grown = load32(sources[family]), load32(tmp_path / "grown")
    model_type = MODEL_TYPE.get(family, family)
    assert type(grown) is type(original) and type(grown).__module__.startswith(f"transformers.models.{model_type.split('_text')[0]}.")
    for dim, value in options.items():  # the stock class really has the new sizes
        if dim in ("num_layers", "hidden_size"):
            assert getattr(grown.config, {"num_layers": "num_hidden_layers"}.get(dim, dim)) == value
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in original.parameters())
    ids = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (original(ids).logits - grown(ids).logits).abs().max().item()
        prompt = ids[:1, :6]
        same_text = torch.equal(original.generate(prompt, max_new_tokens=10, do_sample=False),
                                grown.generate(prompt, max_new_tokens=10, do_sample=False))
    MEASURED[family] = max(MEASURED.get(family, 0.0), diff)
    assert diff <= 1e-5, (family, options, diff)
    assert same_text
    assert result.plan.target.layers == grown.config.num_hidden_layers


# ── what a family cannot grow exactly: one line saying why, exit 2, nothing written ─────────────────────────────


@pytest.mark.parametrize(
    "family, args, words",
    [
        ("qwen3", ["--hidden-size", "40"], ["by whole copies", "a multiple of 32 (e.g. 64)"]),
        ("qwen3", ["--head-dim", "16"], ["cannot grow --head-dim exactly", "normalise over head_dim"]),
        ("gemma3_text", ["--hidden-size", "64"], ["by whole copies", "a multiple of 48"]),
        ("olmo2", ["--num-attention-heads", "8"], ["cannot grow --num-attention-heads exactly",
                                                   "all heads × head_dim together"]),
        ("olmo2", ["--hidden-size", "64"], ["cannot grow --hidden-size exactly", "grow --num-layers, "
                                            "--intermediate-size or --num-key-value-heads only"]),
        ("falcon_alibi", ["--num-attention-heads", "8", "--hidden-size", "64"], ["ALiBi", "--num-layers"]),
        ("falcon", ["--num-key-value-heads", "2"], ["multi-query", "leave --num-key-value-heads out"]),
        ("falcon_mha", ["--num-key-value-heads", "8"], ["one KV head per query head"]),
        ("gpt2", ["--num-key-value-heads", "8"], ["one KV head per query head"]),
        ("gpt2", ["--hidden-size", "34"], ["head_dim = hidden / heads", "--num-attention-heads one of"]),
        ("mixtral", ["--intermediate-size", "64"], ["cannot grow --intermediate-size exactly", "mixture-of-experts",
                                                     "grow --num-layers, --num-attention-heads"]),
        ("qwen3_moe", ["--hidden-size", "64"], ["cannot grow --hidden-size exactly", "mixture-of-experts"]),
        ("gpt_oss", ["--head-dim", "16"], ["rope_type 'yarn'", "grow heads instead"]),
        ("olmo3", ["--num-attention-heads", "8"], ["cannot grow --num-attention-heads exactly",
                                                   "all heads × head_dim together"]),
    ],
)
def test_what_a_family_cannot_grow_is_refused_with_the_reason(sources, tmp_path, family, args, words):
    out = tmp_path / "out"
    assert_clean_error(run_cli("grow", sources[family], "-o", out, "--no-verify", *args), *words, output=out)


def test_olmo2_new_kv_heads_must_be_copies(tmp_path):
    """OLMo2's k norm spans all KV heads: only whole copies (a multiple of the KV heads) keep its statistics."""
    source = save_tiny(tmp_path / "src", "olmo2", hidden_size=48, num_attention_heads=6, num_key_value_heads=2)
    out = tmp_path / "out"
    assert_clean_error(run_cli("grow", source, "-o", out, "--no-verify", "--num-key-value-heads", "3"),
                       "must be copies", "a multiple of 2 (e.g. 4)", output=out)


@pytest.mark.parametrize("options", [dict(num_layers=4, new_layers_at="0,0"),
                                     dict(num_layers=3, new_layers_at="0", hidden_size=40, num_attention_heads=5)])
def test_gpt2_layer_index_scaling_follows_moved_layers(tmp_path, options):
    """GPT-2 with scale_attn_by_inverse_layer_idx divides layer j's scores by j + 1: inserted layers renumber the old
    ones, whose q is rescaled by (j+1)/(i+1) — exact. Without the rescale the logits move (the check can fail)."""
    from safetensors.torch import load_file, save_file

    source = save_tiny(tmp_path / "src", "gpt2", scale_attn_by_inverse_layer_idx=True, **FP32_SCALE[True])
    grow_tiny(source, tmp_path / "grown", **options)
    ids = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = load32(source)(ids).logits
        diff = (reference - load32(tmp_path / "grown")(ids).logits).abs().max().item()
        assert diff <= 1e-5
        weights = tmp_path / "grown" / "model.safetensors"
        state = load_file(str(weights))
        moved = f"transformer.h.{options['num_layers'] - 1}.attn.c_attn"  # old layer 1 now sits last
        hidden = state[f"{moved}.weight"].shape[0]
        factor = options["num_layers"] / 2  # (j+1)/(i+1) with i = 1
        state[f"{moved}.weight"][:, :hidden] /= factor
        state[f"{moved}.bias"][:hidden] /= factor
        save_file(state, str(weights), metadata={"format": "pt"})
        assert (reference - load32(tmp_path / "grown")(ids).logits).abs().max().item() > 1e-4  # ≫ the exact figure


def test_new_post_norm_layers_zero_the_post_norm_gain_not_the_writer(sources, tmp_path):
    """Gemma2/3 and OLMo2 normalise each sub-layer's output: a new layer silences itself through a zero post-norm
    gain (stored −1 for Gemma's 1 + w) and keeps a live o_proj/down_proj, so no RMSNorm(0) sits in the new path."""
    from safetensors.torch import load_file

    grow_tiny(sources["gemma2"], tmp_path / "g", num_layers=3)
    state = load_file(str(tmp_path / "g" / "model.safetensors"))
    new = "model.layers.2."
    assert torch.equal(state[new + "post_attention_layernorm.weight"], torch.full((48,), -1.0))
    assert torch.equal(state[new + "post_feedforward_layernorm.weight"], torch.full((48,), -1.0))
    assert state[new + "self_attn.o_proj.weight"].abs().sum() > 0 and state[new + "mlp.down_proj.weight"].abs().sum() > 0


@pytest.mark.real_model  # borrows the bundled SmolLM2 tokenizer
@pytest.mark.parametrize("family, args", [
    ("gemma2", ["--num-layers", "3", "--head-dim", "20", "--hidden-size", "64"]),
    ("falcon_grouped", ["--num-attention-heads", "6", "--num-key-value-heads", "3", "--hidden-size", "48"]),
    ("gpt2", ["--num-layers", "3", "--hidden-size", "40", "--num-attention-heads", "5"]),
    ("olmo2", ["--num-layers", "3", "--num-key-value-heads", "4"]),
    # float64 verification of mixture-of-experts models (the experts' eager loop: grouped_mm has no float64 path)
    ("mixtral", ["--num-layers", "3", "--num-attention-heads", "8", "--num-key-value-heads", "4"]),
])
def test_cli_verifies_new_families_on_real_text(smollm2_dir, tmp_path, family, args):
    """The command end to end with its own verification (both models on the default texts, greedy text, sdpa) for
    a family of each new kind: tiny models with SmolLM2's vocabulary and tokenizer."""
    from transformers import AutoTokenizer

    source = save_tiny(tmp_path / "src", family, vocab_size=49152, max_position_embeddings=512)
    AutoTokenizer.from_pretrained(str(smollm2_dir)).save_pretrained(source)
    out = tmp_path / "grown"
    result = run_cli("grow", source, "-o", out, *args)
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "Generations match" in result.output
    assert MODEL_TYPE.get(family, family) == load32(out).config.model_type


@pytest.mark.parametrize("family, options, field, expected", [
    # SmolLM3 no_rope_layers [1, 0] (NoPE on layer 1): the new layers copy their source's flag
    ("smollm3", dict(num_layers=4, new_layers_at="0,1"), "no_rope_layers", [1, 1, 0, 0]),
    # Qwen3-MoE: layer 1 dense (mlp_only_layers [1]); interleaving puts new layers after layer 0 (sparse) and 1
    ("qwen3_moe", dict(num_layers=4, new_layers_at="0,1"), "mlp_only_layers", [2, 3]),
    ("gpt_oss", dict(num_layers=3, new_layers_at="0"), "layer_types",
     ["sliding_attention", "sliding_attention", "full_attention"]),
])
def test_per_layer_config_lists_follow_their_layers(sources, tmp_path, family, options, field, expected):
    """Depth growth extends the config's per-layer lists with each new layer's source entry (the exactness test
    above fails without it: a NoPE layer that gained RoPE, a dense layer that became MoE)."""
    grow_tiny(sources[family], tmp_path / "grown", **options)
    assert getattr(load32(tmp_path / "grown").config, field) == expected


def test_new_moe_layers_write_zero_through_their_experts(sources, tmp_path):
    """A new Mixtral layer keeps a live router and experts' readers, and zero expert down projections (w2)."""
    from safetensors.torch import load_file

    grow_tiny(sources["mixtral"], tmp_path / "g", num_layers=3)
    state = load_file(str(tmp_path / "g" / "model.safetensors"))
    new = "model.layers.2.block_sparse_moe."
    assert all(not state[f"{new}experts.{e}.w2.weight"].any() for e in range(3))
    assert state[f"{new}experts.0.w1.weight"].abs().sum() > 0 and state[f"{new}gate.weight"].abs().sum() > 0
