"""Property: for random small configs and random growth targets (valid by construction), per family, the grown
model loaded fresh with the stock class computes the source's logits (float64 checkpoints, ≤ 1e-5)."""

import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from tests.grow_helpers import grow_tiny, save_tiny
from tests.helpers import random_ids

FREE_HEAD_DIM = ("llama", "mistral", "qwen2", "gemma")  # head_dim is its own config field
PARTIAL_ROTARY = {"stablelm": 0.25, "gpt_neox": 0.25, "phi3": 0.5}


@st.composite
def growth(draw, family):
    """(source config overrides, grow options)."""
    neox = family == "gpt_neox"
    kv, group = (draw(st.integers(1, 3)), 1) if neox else (draw(st.integers(1, 2)), draw(st.integers(1, 3)))
    heads = kv * group
    if family in FREE_HEAD_DIM:
        head_dim = draw(st.sampled_from([4, 6, 8]))
        hidden = heads * draw(st.integers(2, 4)) if family == "llama" else draw(st.integers(8, 20))
        prf = 1.0
    else:
        prf = draw(st.sampled_from([PARTIAL_ROTARY[family], 1.0]))
        head_dim = draw(st.sampled_from([8, 16] if prf < 1 else [4, 8]))
        hidden = heads * head_dim
    source = dict(num_hidden_layers=draw(st.integers(1, 2)), num_attention_heads=heads, hidden_size=hidden,
                  intermediate_size=draw(st.integers(8, 24)))
    if not neox:
        source["num_key_value_heads"] = kv
    if family in FREE_HEAD_DIM:
        source["head_dim"] = head_dim
    elif family == "gpt_neox":
        source["rotary_pct"] = prf
    else:
        source["partial_rotary_factor"] = prf

    r = 1 if neox else draw(st.integers(1, 2))  # each old KV head copied r times, plus e new ones
    new_kv = kv * r + draw(st.integers(0, 1))
    new_group = 1 if neox else draw(st.integers(math.ceil(group / r), math.ceil(group / r) + 1))
    new_heads = new_kv * new_group
    step = 1 if prf < 1 else 2  # full rotary needs an even head_dim
    new_head_dim = draw(st.sampled_from([head_dim, head_dim + step, head_dim + 2 * step, 2 * head_dim]))
    if family in FREE_HEAD_DIM:
        new_hidden = hidden + draw(st.integers(0, 8))
        if family == "llama":  # transformers' LlamaConfig insists on hidden % heads == 0
            new_hidden = new_heads * math.ceil(new_hidden / new_heads)
    else:
        new_hidden = new_heads * new_head_dim
    options = dict(num_layers=source["num_hidden_layers"] + draw(st.integers(0, 2)),
                   intermediate_size=source["intermediate_size"] + draw(st.integers(0, 8)),
                   num_attention_heads=new_heads, head_dim=new_head_dim, hidden_size=new_hidden,
                   new_layers_at=draw(st.sampled_from(["append", "interleave"])),
                   layer_init=draw(st.sampled_from(["copy", "normal"])), seed=draw(st.integers(0, 3)))
    if not neox:
        options["num_key_value_heads"] = new_kv
    return source, options


def check(family, source_overrides, options):
    with tempfile.TemporaryDirectory() as tmp:
        source = save_tiny(Path(tmp) / "source", family, dtype=torch.float64, **source_overrides)
        grow_tiny(source, Path(tmp) / "grown", **options)
        load = lambda p: AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float64,
                                                              attn_implementation="eager").eval()
        original, grown = load(source), load(Path(tmp) / "grown")
        assert type(grown) is type(original)
        with torch.no_grad():
            ids = random_ids(length=12)
            diff = (original(ids).logits - grown(ids).logits).abs().max().item()
        assert diff <= 1e-5, (source_overrides, options, diff)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma", "stablelm", "gpt_neox", "phi3"])
def test_random_growth_is_exact(family):
    @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(growth(family))
    def run(case):
        check(family, *case)

    run()
