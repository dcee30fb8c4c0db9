"""Property: for random small configs and random growth targets (valid by construction), per family, the grown
model loaded fresh with the stock class computes the source's logits (float64 checkpoints, ≤ 1e-5). Every family of
netmorph/arch/families.py, Falcon in its four attention shapes; each draws only the dims its family grows."""

import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from tests.grow_helpers import MODEL_TYPE, grow_tiny, save_tiny
from tests.helpers import random_ids

FREE_HEAD_DIM = ("llama", "mistral", "qwen2", "gemma", "gemma2", "qwen3", "gemma3_text", "ministral")  # head_dim: own field
PARTIAL_ROTARY = {"stablelm": 0.25, "gpt_neox": 0.25, "phi3": 0.5}
KV_IS_HEADS = ("gpt_neox", "gpt2", "falcon_mha")  # one KV head per query head, always
KV_IS_ONE = ("falcon",)  # multi-query
FIXED_WIDTH = ("qwen3", "gemma3_text", "olmo2", "olmo3", "falcon_alibi")  # q/k norms or ALiBi: head_dim stays (hidden too,
# except by whole copies for COPIES_HIDDEN)
FIXED_HEADS = ("olmo2", "olmo3", "falcon_alibi")  # query heads stay (OLMo2's KV heads grow by whole copies only)
COPIES_HIDDEN = ("qwen3", "gemma3_text")
DIVIDES_HIDDEN = ("llama", "gemma2", "gemma3_text")  # their config classes insist on hidden % heads == 0
FIELD_NAMES = {"gpt2": {"intermediate_size": "n_inner"},
               "falcon": {"intermediate_size": "ffn_hidden_size", "num_key_value_heads": "num_kv_heads"}}


@st.composite
def growth(draw, family):
    """(source config overrides, grow options), valid by construction for the family's growable dims."""
    model_type = MODEL_TYPE.get(family, family)
    if family in KV_IS_HEADS or family in KV_IS_ONE:
        kv, group = (draw(st.integers(1, 3)), 1) if family in KV_IS_HEADS else (1, draw(st.integers(1, 4)))
    else:
        kv, group = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4] if family in ("olmo2", "olmo3") else [1, 2, 3]))
    heads = kv * group
    rotary = model_type != "gpt2" and family != "falcon_alibi"
    prf = draw(st.sampled_from([PARTIAL_ROTARY[family], 1.0])) if family in PARTIAL_ROTARY else 1.0
    if family in FREE_HEAD_DIM:
        head_dim = draw(st.sampled_from([4, 6, 8]))
        # hidden ≥ 8: below that the source's own rounding is the figure (Gemma2 at hidden 2: 2e-5 — it normalises
        # in float32 even in a float64 model)
        per_head = math.ceil(8 / heads)
        hidden = (24 if family in FIXED_WIDTH else heads * draw(st.integers(per_head, per_head + 2))) \
            if family in DIVIDES_HIDDEN else draw(st.integers(8, 20))
    else:
        head_dim = draw(st.sampled_from([8, 16] if prf < 1 else [4, 8] if rotary else [2, 3, 4]))
        hidden = heads * head_dim
    source = dict(num_hidden_layers=draw(st.integers(1, 2)), num_attention_heads=heads, hidden_size=hidden,
                  intermediate_size=draw(st.integers(8, 24)))
    if family not in KV_IS_HEADS + KV_IS_ONE + ("falcon_alibi",):
        source["num_key_value_heads"] = kv
    if model_type == "gpt2":  # scores ÷ (layer index + 1): inserted layers move the old ones
        source["scale_attn_by_inverse_layer_idx"] = draw(st.booleans())
    if family in ("gemma3_text", "olmo3", "ministral"):  # their tiny configs list one type per layer
        source["layer_types"] = ["sliding_attention", "full_attention"][:source["num_hidden_layers"]]
    if family in FREE_HEAD_DIM:
        source["head_dim"] = head_dim
    elif family == "gpt_neox":
        source["rotary_pct"] = prf
    elif family in PARTIAL_ROTARY:
        source["partial_rotary_factor"] = prf

    if family in FIXED_HEADS:  # olmo2: each old KV head copied r times, query heads unchanged
        r = draw(st.sampled_from([d for d in (1, 2, 4) if group % d == 0])) if family in ("olmo2", "olmo3") else 1
        new_kv, new_group = kv * r, group // r
    elif family in KV_IS_HEADS or family in KV_IS_ONE:
        new_kv = kv + draw(st.integers(0, 2)) if family in KV_IS_HEADS else 1
        new_group = 1 if family in KV_IS_HEADS else group + draw(st.integers(0, 2))
    else:  # each old KV head copied r times, plus e new ones
        r = draw(st.integers(1, 2))
        new_kv = kv * r + draw(st.integers(0, 1))
        new_group = draw(st.integers(math.ceil(group / r), math.ceil(group / r) + 1))
    new_heads = new_kv * new_group
    step = 2 if rotary and prf == 1.0 else 1  # full rotary needs an even head_dim
    new_head_dim = head_dim if family in FIXED_WIDTH else draw(
        st.sampled_from([head_dim, head_dim + step, head_dim + 2 * step, 2 * head_dim]))
    if family in COPIES_HIDDEN:  # hidden grows by whole copies of the residual stream
        new_hidden = hidden * draw(st.integers(1, 3))
    elif family in FIXED_WIDTH:
        new_hidden = hidden
    elif family in FREE_HEAD_DIM:
        new_hidden = hidden + draw(st.integers(0, 8))
        if family in DIVIDES_HIDDEN:
            new_hidden = new_heads * math.ceil(new_hidden / new_heads)
    else:
        new_hidden = new_heads * new_head_dim
    assume(family not in DIVIDES_HIDDEN or new_hidden % new_heads == 0)
    options = dict(num_layers=source["num_hidden_layers"] + draw(st.integers(0, 2)),
                   intermediate_size=source["intermediate_size"] + draw(st.integers(0, 8)),
                   num_attention_heads=new_heads, head_dim=new_head_dim, hidden_size=new_hidden,
                   new_layers_at=draw(st.sampled_from(["append", "interleave"])),
                   layer_init=draw(st.sampled_from(["copy", "normal"])), seed=draw(st.integers(0, 3)))
    if "num_key_value_heads" in source:
        options["num_key_value_heads"] = new_kv
    for generic, name in FIELD_NAMES.get(model_type, {}).items():
        if generic in source:
            source[name] = source.pop(generic)
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


FAMILIES_BEFORE_ISSUE_6 = ["llama", "mistral", "qwen2", "gemma", "stablelm", "gpt_neox", "phi3"]
NEW_FAMILIES = ["qwen3", "gemma2", "gemma3_text", "olmo2", "gpt2", "falcon", "falcon_grouped", "falcon_mha",
                "falcon_alibi"]


# the dense families of issue 21 (NoPE layers, multipliers, OLMo3's and Ministral's sliding layers); the MoE ones
# are covered case by case in test_grow_families (their experts' kernel has no float64 path)
ISSUE_21_FAMILIES = ["smollm3", "granite", "olmo3", "ministral"]


@pytest.mark.parametrize("family", FAMILIES_BEFORE_ISSUE_6 + NEW_FAMILIES + ISSUE_21_FAMILIES)
def test_random_growth_is_exact(family):
    examples = 6 if family in FAMILIES_BEFORE_ISSUE_6 else 4 if family in ISSUE_21_FAMILIES else 8

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(growth(family))
    def run(case):
        check(family, *case)

    run()
