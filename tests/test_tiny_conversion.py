"""Every family × exact mode × backend on tiny random models: converted == original (fp32)."""

import pytest
import torch

from tests.helpers import FAMILIES, convert, load, max_logit_diff, random_ids, save_tiny_model

EXACT_MODES = {
    "default": {},
    "zero-init": {"zero_init": True},
    "mirror": {"mirror_weights": True},
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
        assert converted.config.model_type == "netmorph_diff"
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


@pytest.mark.parametrize("option", ["split_heads", "sublayer_norm"])
def test_approximate_modes_report_divergence(tmp_path, option):
    source = save_tiny_model(tmp_path / "src", "llama", num_attention_heads=6, num_key_value_heads=2)
    convert(source, tmp_path / "out", **{option: True})
    converted = load(tmp_path / "out")
    diff = max_logit_diff(load(source), converted, random_ids())
    assert 0 < diff < float("inf")
    if option == "split_heads":
        assert converted.model.layers[0].self_attn.q_proj.weight.shape[0] == 6 * 8
        assert converted.config.diff_layout == "split"
