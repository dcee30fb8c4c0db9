"""Hypothesis: random small Llama/Mistral/Qwen2 configs convert exactly in every exact mode."""

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import convert, load, max_logit_diff, random_ids, save_tiny_model


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
        mode=draw(st.sampled_from([{}, {"zero_init": True}, {"mirror_weights": True}, {"lambda_start": "zero"}])),
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
