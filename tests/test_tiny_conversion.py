"""Every family × exact mode × backend on tiny random models: converted == original (fp32)."""

import pytest
import torch

from tests.helpers import FAMILIES, convert, load, max_logit_diff, random_ids, save_tiny_model

pytestmark = pytest.mark.compat  # also run against the oldest and newest transformers (tests/compat.py)

EXACT_MODES = {
    "default": {},
    "zero-init": {"negative_init": "zero"},
    "mirror": {"negative_init": "mirror"},
    "lambda-zero": {"lambda_start": "zero"},
}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("mode", EXACT_MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_modes_match_original(tmp_path, family, mode, tied):
    source = save_tiny_model(tmp_path / "src", family, tie_word_embeddings=tied)
    convert(source, tmp_path / "out", **EXACT_MODES[mode])
    ids = random_ids(length=30)  # longer than the sliding window (7) of mistral/qwen2
    for backend in ("eager", "sdpa"):
        original, converted = load(source, backend), load(tmp_path / "out", backend)
        assert converted.config.model_type == f"netmorph_diff_{family}"
        assert max_logit_diff(original, converted, ids) <= 1e-5, (family, mode, backend)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_mask_matches_original(tmp_path, family):
    source = save_tiny_model(tmp_path / "src", family)
    convert(source, tmp_path / "out")
    ids = random_ids(length=20)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding in the first row
    for backend in ("eager", "sdpa"):
        diff = max_logit_diff(load(source, backend), load(tmp_path / "out", backend), ids, attention_mask=mask)
        assert diff <= 1e-5, (family, backend)


def test_lambda_zero_start_is_exact_at_full_mix(tmp_path):
    source = save_tiny_model(tmp_path / "src", "llama")
    convert(source, tmp_path / "out", lambda_start="zero")
    converted = load(tmp_path / "out")
    for layer in converted.model.layers:
        layer.self_attn.mix.fill_(1.0)
        assert layer.self_attn.lambda_full().item() == 0.0
    assert max_logit_diff(load(source), converted, random_ids()) <= 1e-5


def test_default_mode_diverges_at_full_mix(tmp_path):
    """The negative branch is real: with mix = 1 and the paper's λ the function changes."""
    source = save_tiny_model(tmp_path / "src", "llama")
    convert(source, tmp_path / "out")
    converted = load(tmp_path / "out")
    for layer in converted.model.layers:
        layer.self_attn.mix.fill_(1.0)
    assert max_logit_diff(load(source), converted, random_ids()) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("option", ["split_heads", "sublayer_norm"])
def test_approximate_modes_report_divergence(tmp_path, family, option):
    source = save_tiny_model(tmp_path / "src", family, num_attention_heads=6, num_key_value_heads=2)
    convert(source, tmp_path / "out", **{option: True})
    ids = random_ids()
    eager, sdpa = load(tmp_path / "out", "eager"), load(tmp_path / "out", "sdpa")
    assert max_logit_diff(eager, sdpa, ids) <= 1e-5  # both backends compute the same approximate function
    diff = max_logit_diff(load(source), eager, ids)
    assert 0 < diff < float("inf")
    if option == "split_heads":
        assert eager.model.layers[0].self_attn.q_proj.weight.shape[0] == 6 * 8
        assert eager.config.diff_layout == "split"


def test_split_layout_first_value_half_reproduces_source_heads(tmp_path):
    """Split layout at mix = 0: channels [0, d) of differential head j are exactly source head j's output."""
    source = save_tiny_model(tmp_path / "src", "llama", num_attention_heads=6, num_key_value_heads=2)
    convert(source, tmp_path / "out", split_heads=True)
    original, converted = load(source), load(tmp_path / "out")
    hidden = torch.randn(1, 10, 36, generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(10)[None]
    captured = {}
    for name, model in (("source", original), ("split", converted)):
        attn = model.model.layers[0].self_attn
        hook = attn.o_proj.register_forward_hook(lambda m, args, out, key=name: captured.__setitem__(key, args[0]))
        with torch.no_grad():
            embeddings = model.model.rotary_emb(hidden, position_ids)
            attn(hidden, position_embeddings=embeddings, attention_mask=None)
        hook.remove()
    source_heads = captured["source"].view(1, 10, 6, 8)  # (B, T, H, d)
    split_heads = captured["split"].view(1, 10, 3, 16)  # (B, T, H/2, 2d)
    torch.testing.assert_close(split_heads[..., :8], source_heads[:, :, :3], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_flex_attention_backend_matches_original(tmp_path, family):
    source = save_tiny_model(tmp_path / "src", family)
    convert(source, tmp_path / "out")
    ids = random_ids(length=16)
    assert max_logit_diff(load(source, "flex_attention"), load(tmp_path / "out", "flex_attention"), ids) <= 1e-5
    assert max_logit_diff(load(source, "eager"), load(tmp_path / "out", "flex_attention"), ids) <= 1e-5
