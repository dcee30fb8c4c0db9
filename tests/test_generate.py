"""Greedy `generate()` of converted, exported and grown checkpoints against the ORIGINAL stock model.

This is the check that sees a modeling file losing the KV cache: transformers 5.24 renamed the cache argument
`past_key_values` → `cache`, a forward that swallowed the new name in `**kwargs` decoded every step without the past,
and every test that compared the converted model with itself (static vs dynamic cache) still passed.

Every case: a LEFT-PADDED batch of two sequences of different lengths (7 and 12 tokens), NEW greedy tokens, generated
three ways — the dynamic cache (generate's default), a static cache (`cache_implementation="static"`) and
`use_cache=False` — each compared token for token with the original model's generation. Sliding windows (7) are
shorter than prompt + new tokens. Models load fresh from disk (as a user loads them) in fp32 on SDPA (eager for
Gemma2, whose stock class has no SDPA path).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from netmorph.surgery.grow import grow
from netmorph.options import GrowOptions
from tests.family_models import save_family_model
from tests.grow_helpers import save_tiny as save_grow_source
from tests.helpers import convert, save_tiny_model
from tests.test_property_modes import pair_heads

pytestmark = pytest.mark.compat

NEW = 16
LENGTHS = (7, 12)
BACKEND = {"gemma2": "eager", "gpt_oss": "eager"}  # stock classes without an SDPA path
WAYS = {"dynamic cache": {}, "static cache": {"cache_implementation": "static"}, "no cache": {"use_cache": False}}


def padded_batch(vocab_size: int = 97, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of two random sequences of LENGTHS, left-padded with `pad_id`."""
    generator = torch.Generator().manual_seed(11)
    width = max(LENGTHS)
    ids = torch.full((len(LENGTHS), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(LENGTHS):
        ids[row, width - length:] = torch.randint(3, vocab_size, (length,), generator=generator)
        mask[row, width - length:] = 1
    return ids, mask


def load(path, backend="sdpa", dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=backend).eval()


@torch.no_grad()
def generate(model, ids, mask, **how) -> torch.Tensor:
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **how)


@torch.no_grad()
def generate_without_the_past(model, ids, mask) -> torch.Tensor:
    """What a model that loses its KV cache generates: the prompt's forward gives the first token right, then every
    step sees only its own new token (at its true position). The tests assert the reference differs from this, so
    each case can see a lost cache (a random tiny model that ignores its context could not)."""
    rows = []
    for row_ids, row_mask in zip(ids, mask):
        prompt = row_ids[row_mask.bool()][None]
        tokens = [model(prompt).logits[0, -1].argmax().item()]
        for step in range(1, NEW):
            position = torch.tensor([[prompt.shape[1] + step - 1]])
            tokens.append(model(torch.tensor([[tokens[-1]]]), position_ids=position).logits[0, -1].argmax().item())
        rows.append(tokens)
    return torch.tensor(rows)


def assert_generates_like(original_dir, new_dir, backend="sdpa"):
    """The new checkpoint generates the original's tokens, with a dynamic cache, a static cache and no cache."""
    ids, mask = padded_batch()
    original = load(original_dir, backend)
    expected = generate(original, ids, mask)
    assert not torch.equal(expected[:, -NEW:], generate_without_the_past(original, ids, mask)), \
        "this source model's text does not depend on its context: the case could not see a lost cache"
    model = load(new_dir, backend)
    for way, how in WAYS.items():
        got = generate(model, ids, mask, **how)
        assert torch.equal(got, expected), f"{way}: {got[:, -NEW:].tolist()} != {expected[:, -NEW:].tolist()}"


# ── converted: every layout, the Llama class and the stock-family classes ──

EXACT_LAYOUTS = {"doubled": {}, "v2": {"variant": "v2"}}
FAMILIES = ["qwen3", "gemma2", "gpt2", "phi3", "falcon", "mixtral", "qwen3_moe", "gpt_oss", "smollm3", "granite", "olmo3",
            "ministral"]


@pytest.mark.parametrize("layout", EXACT_LAYOUTS)
def test_llama_conversion_generates_like_the_original(tmp_path, layout):
    source = save_tiny_model(tmp_path / "src", "llama")  # 9 query / 3 KV heads, head_dim 8, q/k/v/o biases
    convert(source, tmp_path / "out", **EXACT_LAYOUTS[layout])
    assert_generates_like(source, tmp_path / "out")


@pytest.mark.parametrize("layout", EXACT_LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_conversion_generates_like_the_original(tmp_path, family, layout):
    source = save_family_model(tmp_path / "src", family)
    convert(source, tmp_path / "out", **EXACT_LAYOUTS[layout])
    assert_generates_like(source, tmp_path / "out", BACKEND.get(family, "sdpa"))


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_split_layout_generates_like_the_original_when_paired_heads_attend_alike(tmp_path, family):
    """Split heads is exact when source heads j and j + H/2 are equal (tests/test_property_modes.pair_heads)."""
    heads, kv_heads, head_dim = 6, 2, 8
    source = save_tiny_model(tmp_path / "src", family, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             head_dim=head_dim)
    pair_heads(source, heads, kv_heads, head_dim, layers=2)
    convert(source, tmp_path / "out", split_heads=True)
    assert_generates_like(source, tmp_path / "out")


def test_diffllama_export_generates_like_the_original(tmp_path):
    """The stock DiffLlama export (approximate: its mandatory per-head norm; anchored to ~1e-3 of a logit on these
    models) still picks the original's tokens, with each of the stock class's own cache paths."""
    source = save_tiny_model(tmp_path / "src", "llama")
    convert(source, tmp_path / "out", export="diffllama")
    assert load(tmp_path / "out").config.model_type == "diffllama"
    assert_generates_like(source, tmp_path / "out")


@pytest.mark.parametrize("layout", ["doubled", "split", "v2"])
def test_switched_on_models_generate_the_same_with_and_without_the_cache(tmp_path, layout):
    """λ ≠ 0 (mix = 1; V2: random lambda_proj and perturbed negative heads): the negative branch's cached keys
    matter, and the model is no longer the original's function — its own no-cache generation (a full forward each
    step, no cache involved) is the reference."""
    from tests.test_masks import switched_on

    source = save_tiny_model(tmp_path / "src", "mistral", num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    convert(source, tmp_path / "out", **{"doubled": {}, "split": {"split_heads": True}, "v2": {"variant": "v2"}}[layout])
    model = switched_on(tmp_path / "out", "sdpa")
    ids, mask = padded_batch()
    expected = generate(model, ids, mask, use_cache=False)
    assert not torch.equal(expected, generate(load(source), ids, mask)), "λ should change the generated text"
    for way in ("dynamic cache", "static cache"):
        assert torch.equal(generate(model, ids, mask, **WAYS[way]), expected), way


# ── grown: stock classes, no remote code ──

GROWTHS = {
    "llama": dict(num_layers=3, intermediate_size=64, num_attention_heads=12, num_key_value_heads=4, head_dim=10,
                  hidden_size=48),
    "qwen3": dict(num_layers=3, intermediate_size=64, num_attention_heads=8, num_key_value_heads=4),
    "gpt2": dict(num_layers=3, intermediate_size=64, num_attention_heads=8, hidden_size=64),
    "phi3": dict(num_layers=3, intermediate_size=80, num_attention_heads=8, num_key_value_heads=4, hidden_size=96),
    "falcon": dict(num_layers=3, intermediate_size=64),
    "gemma2": dict(num_layers=3, intermediate_size=80, num_attention_heads=8, num_key_value_heads=4),
    "mixtral": dict(num_layers=3, num_attention_heads=8, num_key_value_heads=4, head_dim=16),
    "gpt_oss": dict(num_layers=3, num_attention_heads=8, num_key_value_heads=4),
    "smollm3": dict(num_layers=3, intermediate_size=64, num_attention_heads=8, num_key_value_heads=4, hidden_size=64),
}


# Sources whose greedy text depends on the context (see generate_without_the_past); the default grow sources of these
# saturate into one repeated token.
GROW_SOURCES = {"llama": dict(embed_shift=0.0), "gemma2": dict(embed_shift=0.0, initializer_range=0.05),
               "mixtral": dict(embed_shift=0.0), "smollm3": dict(embed_shift=0.0)}


@pytest.mark.parametrize("family", GROWTHS)
def test_grown_model_generates_like_the_original(tmp_path, family):
    source = save_grow_source(tmp_path / "src", family, **GROW_SOURCES.get(family, {}))
    grow(str(source), tmp_path / "out", GrowOptions.build(verify=False, **GROWTHS[family]))
    assert_generates_like(source, tmp_path / "out", BACKEND.get(family, "sdpa"))


# ── half precision: the stock model in the same dtype is the reference ──

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", EXACT_LAYOUTS)
def test_half_precision_conversion_matches_the_stock_model_in_the_same_dtype(tmp_path, layout, dtype):
    """Loaded in bf16/fp16, the converted model runs the original's computation: at mix = 0 the positive branch is
    the source's attention call on the same q/k/v, and DIFF V2's 2·(a − 0.5·a) = a is exact in any binary float, so
    the logits are bitwise equal to the stock model's in that dtype and the generations are identical."""
    source = save_tiny_model(tmp_path / "src", "llama")
    convert(source, tmp_path / "out", **EXACT_LAYOUTS[layout])
    original, converted = load(source, dtype=dtype), load(tmp_path / "out", dtype=dtype)
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = original(ids, attention_mask=mask).logits
        got = converted(ids, attention_mask=mask).logits
    assert got.dtype == dtype and torch.isfinite(got[mask.bool()]).all()
    assert torch.equal(got[mask.bool()], expected[mask.bool()])
    assert torch.equal(generate(converted, ids, mask), generate(original, ids, mask))
