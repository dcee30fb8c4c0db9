"""Hypothesis: random small Llama/Mistral/Qwen2 configs convert exactly in every exact mode (mix = 0); and with the
negative branch switched on — a random mix, random λ vectors, random negative weights — every layout computes what
the independent reference (tests/reference/differential_transformer.py) computes."""

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch

from tests.helpers import convert, load, max_logit_diff, random_ids, save_tiny_model
from tests.reference.differential_transformer import reference_logits


@st.composite
def configs(draw):
    kv_heads = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    heads = kv_heads * groups
    head_dim = draw(st.sampled_from([4, 8, 12]))
    return dict(
        family=draw(st.sampled_from(["llama", "mistral", "qwen2"])),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=heads * draw(st.integers(1, 4)) * 2,
        num_hidden_layers=draw(st.integers(1, 3)),
        tie_word_embeddings=draw(st.booleans()),
        mode=draw(st.sampled_from([{}, {"negative_init": "zero"}, {"negative_init": "mirror"}, {"lambda_start": "zero"}])),
        seed=draw(st.integers(0, 2**16)),
        length=draw(st.integers(1, 20)),
    )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_random_configs_convert_exactly(params):
    family, mode, seed, length = (params.pop(k) for k in ("family", "mode", "seed", "length"))
    with tempfile.TemporaryDirectory() as tmp:
        source = save_tiny_model(Path(tmp) / "src", family, seed=seed, **params)
        convert(source, Path(tmp) / "out", seed=seed, **mode)
        ids = random_ids(length=length, seed=seed)
        for backend in ("eager", "sdpa"):
            assert max_logit_diff(load(source, backend), load(Path(tmp) / "out", backend), ids) <= 1e-5


@st.composite
def live_configs(draw):
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    heads = kv_heads * draw(st.integers(1, 3))
    layout = draw(st.sampled_from(["doubled", "split", "v2"]))
    if layout == "split" and (heads % 2 or kv_heads % 2):
        kv_heads, heads = 2, 2 * heads
    return dict(
        family=draw(st.sampled_from(["llama", "mistral", "qwen2"])),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=draw(st.sampled_from([4, 8])),
        hidden_size=heads * draw(st.integers(1, 3)) * 2, num_hidden_layers=draw(st.integers(1, 2)),
        tie_word_embeddings=draw(st.booleans()),
        layout=layout, sublayer_norm=layout != "v2" and draw(st.booleans()),
        mix=draw(st.floats(0.05, 1.0)), scale=draw(st.floats(0.05, 1.0)),
        seed=draw(st.integers(0, 2**16)), length=draw(st.integers(2, 20)),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(live_configs())
def test_random_configs_with_a_live_negative_branch_match_the_reference(params):
    """float64, tolerance 2e-5: transformers' stock RMSNorm and RoPE tables compute in fp32 even in float64 (see
    tests/test_reference.py), an error that grows with the logits' size — a fresh-clone run drew a 2-layer llama
    (8/4 heads of 4, untied, mix 1, scale 1, seed 2) at 1.01e-5, past the earlier 1e-5, while a wrong formula (λ sign,
    RoPE pairing) is off by ≥ 1e-2. λ vectors, negative q/k rows (V2: lambda_proj, odd query heads) get N(0, scale²)."""
    family, layout, mix, scale, seed, length = (params.pop(k) for k in ("family", "layout", "mix", "scale", "seed",
                                                                         "length"))
    options = {"doubled": {}, "split": {"split_heads": True}, "v2": {"variant": "v2"}}[layout]
    options["sublayer_norm"] = params.pop("sublayer_norm")
    generator = torch.Generator().manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        source = save_tiny_model(Path(tmp) / "src", family, seed=seed, **params)
        model = load(convert(source, Path(tmp) / "out", seed=seed, **options).output_dir, "sdpa").double()
        with torch.no_grad():
            for name, tensor in model.named_parameters():
                if name.endswith(("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "lambda_proj.weight")):
                    tensor.copy_(scale * torch.randn(tensor.shape, generator=generator, dtype=torch.float64))
                elif name.endswith(("q_proj.weight", "k_proj.weight")) and layout != "split":
                    tensor[tensor.shape[0] // 2:] += scale * torch.randn(tensor[tensor.shape[0] // 2:].shape,
                                                                         generator=generator, dtype=torch.float64)
            for name, buffer in model.named_buffers():
                if name.endswith(".mix"):
                    buffer.fill_(mix)
            ids = random_ids(length=length, seed=seed)
            positions = torch.arange(length)[None].expand(ids.shape[0], -1)
            ours = model(ids, use_cache=False).logits
        expected = reference_logits(model.state_dict(), model.config.to_dict(), ids, positions)
        assert (ours - expected).abs().max().item() <= 2e-5
