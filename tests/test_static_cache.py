"""Static KV caches and torch.compile: a converted model decodes over a preallocated `StaticCache`, and the decode
step compiles with `fullgraph=True` (no graph break) — the path `generate` takes on a GPU with
`cache_implementation="static"`. On this CPU machine inductor compiles C++; the GPU run compiles Triton from the
same graph.

λ is switched on (mix = 1; DIFF V2 with random lambda_proj and perturbed negative heads) so both branches matter,
and Mistral's sliding window (7) is shorter than the sequences, so the static cache's sliding layers are exercised.
"""

import pytest
import torch
from transformers import StaticCache

from tests.family_models import save_family_model
from tests.helpers import cache_argument, convert, random_ids, save_tiny_model
from tests.test_convert_families import load as load_family
from tests.test_masks import switched_on

LAYOUTS = {"doubled": {}, "split": {"split_heads": True}, "v2": {"variant": "v2"}}
PROMPT, NEW = 10, 12  # prompt + new tokens = 22 > the sliding window of 7


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("static")
    save_tiny_model(root / "mistral", "mistral", num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    return {layout: convert(root / "mistral", root / layout, **options).output_dir for layout, options in LAYOUTS.items()}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_greedy_generation_with_a_static_cache_equals_the_dynamic_cache(converted, layout, backend):
    model = switched_on(converted[layout], backend)
    ids = random_ids(batch=2, length=PROMPT)
    dynamic = model.generate(ids, max_new_tokens=NEW, do_sample=False)
    static = model.generate(ids, max_new_tokens=NEW, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_decode_over_a_static_cache_matches_one_full_forward(converted, layout):
    model = switched_on(converted[layout], "sdpa")
    ids = random_ids(batch=2, length=PROMPT + NEW, seed=4)
    cache = StaticCache(config=model.config, max_cache_len=32)
    step = torch.compile(model.forward, fullgraph=True)  # fullgraph: a graph break raises instead of falling back
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        pieces = [model(ids[:, :PROMPT], **cache_argument(model, cache), use_cache=True).logits]
        for position in range(PROMPT, ids.shape[1]):
            pieces.append(step(ids[:, position:position + 1], **cache_argument(model, cache), use_cache=True,
                               position_ids=torch.full((2, 1), position)).logits)
    # Compiled kernels fuse and reorder fp32 sums: a few ulps of the logits, not a masking or cache error (those
    # are O(1)).
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 5e-5


@pytest.mark.parametrize("variant", ["qwen3", "gemma2", "phi3", "gpt2", "falcon", "mixtral", "qwen3_moe", "gpt_oss",
                                     "smollm3", "granite", "olmo3", "ministral"])
def test_family_models_generate_the_same_with_a_static_cache(tmp_path, variant):
    """The stock-family models (the stock decoder around netmorph's attention) in the doubled layout."""
    source = save_family_model(tmp_path / variant, variant)
    model = load_family(convert(source, tmp_path / f"{variant}-diff").output_dir, "eager")
    for module in model.modules():
        if hasattr(module, "mix"):
            module.mix.fill_(1.0)
    ids = random_ids(batch=2, length=PROMPT)
    dynamic = model.generate(ids, max_new_tokens=NEW, do_sample=False)
    static = model.generate(ids, max_new_tokens=NEW, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic)
