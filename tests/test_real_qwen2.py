"""The second real model: Qwen2.5-Coder-0.5B-Instruct (tests/real_models.py; qwen2: 24 layers, hidden 896, 14 query /
2 KV heads of 64, q/k/v biases, untied lm_head, vocabulary 151,936), dequantized from its GGUF to fp32 once.

What SmolLM2 (llama) does not cover and this does: attention biases carried into both differential branches and
through head/head_dim/hidden growth, an untied output head, a GQA ratio of 7, RoPE θ = 10⁶, a 150k-token BPE tokenizer.

The original is the reference for every check: logits on real text (the Apache-2.0 and GPL-3 licence texts) in fp32
and in bf16, greedy generation of a left-padded batch with the KV cache (and without it), and the `netmorph verify`
command. Tolerances as in test_real_model.py / test_grow_real.py: a conversion is exact at mix = 0, so fp32 logits
agree within 1e-4 and bf16 logits are bitwise equal on the unpadded positions; growth is measured in float64 (≤ 1e-4)
and in fp32 within 1e-4 plus twice the source's own fp32 rounding.
"""

import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from netmorph.options import GrowOptions
from netmorph.sources import default_texts
from netmorph.surgery.grow import grow
from tests.helpers import convert, require_free_space
from tests.real_models import qwen2_gguf

pytestmark = [pytest.mark.real_model, pytest.mark.xdist_group("qwen2")]

TOKENS = 128  # of each licence text: 2 × 128 tokens through a 0.5B model on one CPU thread is a few seconds
PROMPTS = ["def fibonacci(n):", "The license grants you the right to", "Once upon a time"]
NEW_TOKENS = 12
VARIANTS = {"v1": {}, "v2": {"variant": "v2"}}
# fp32 checkpoints kept at once: the dequantized source (2.0 GB), V1 and V2 (≈ 2.1 GB each), the grown model (≈ 2.9 GB)
QWEN2_FREE_BYTES = 12 * 2**30
GROWTH = dict(num_layers=28, new_layers_at="interleave", intermediate_size=5120, num_attention_heads=16,
              head_dim=80, hidden_size=1024)


# Session scope: under `pytest -n 2 --dist loadgroup` the worker that runs this group may run other modules' tests
# between two of these, which tears module-scoped fixtures down (measured: the whole setup ran twice, +104 s).
@pytest.fixture(scope="session")
def qwen2_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2")
    require_free_space(root, QWEN2_FREE_BYTES)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def qwen2_dir(qwen2_root):
    """The GGUF dequantized to an fp32 safetensors directory with its tokenizer (the conversions' source), by
    transformers' own GGUF loader as a user would (each GGUF parse takes 10–30 s, so it is parsed twice, not four
    times as through netmorph's Source)."""
    gguf = qwen2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    assert type(model) is Qwen2ForCausalLM and model.config.num_hidden_layers == 24
    model.config.__dict__.pop("quantization_config", None)  # dequantized on load: saved as plain fp32
    model.hf_quantizer, model.is_quantized = None, False
    directory = qwen2_root / "qwen2"
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tokenizer(qwen2_dir):
    return AutoTokenizer.from_pretrained(str(qwen2_dir))


def load_original(directory, dtype=torch.float32, attn="sdpa"):
    model = Qwen2ForCausalLM.from_pretrained(str(directory), dtype=dtype, attn_implementation=attn).eval()
    assert type(model) is Qwen2ForCausalLM  # the stock class, no remote code
    return model


def load_converted(directory, dtype=torch.float32, attn="sdpa"):
    """Through the checkpoint's own modeling file, as a user without netmorph loads it."""
    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, attn_implementation=attn,
                                                trust_remote_code=True).eval()


def padded_prompts(tokenizer):
    """The prompts as one left-padded batch (different lengths: the mask matters)."""
    encoded = [tokenizer(p).input_ids for p in PROMPTS]
    width = max(map(len, encoded))
    assert min(map(len, encoded)) < width
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(encoded):
        ids[row, width - len(tokens):], mask[row, width - len(tokens):] = torch.tensor(tokens), 1
    return ids, mask


def greedy(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=int(ids[0, 0]), **kwargs)


@pytest.fixture(scope="session")
def reference(qwen2_dir, tokenizer):
    """The original's logits on the real texts (fp32 sdpa and eager, bf16, float64 for the first), its greedy batch."""
    texts = [tokenizer(t, return_tensors="pt").input_ids[:, :TOKENS] for t in default_texts().values()]
    assert len(texts) == 2 and all(ids.shape[1] == TOKENS for ids in texts)
    ids, mask = padded_prompts(tokenizer)
    out = {"texts": texts, "prompt_ids": ids, "prompt_mask": mask}
    with torch.no_grad():
        for attn in ("sdpa", "eager"):
            model = load_original(qwen2_dir, attn=attn)
            out[attn] = [model(t).logits for t in texts]
        out["greedy"] = greedy(model, ids, mask)
        out["bf16"] = [load_original(qwen2_dir, torch.bfloat16)(t).logits for t in texts]
        out["float64"] = load_original(qwen2_dir, torch.float64)(texts[0]).logits
    out["rounding"] = (out["sdpa"][0].double() - out["float64"]).abs().max().item()
    return out


@pytest.fixture(scope="session")
def converted(qwen2_dir, qwen2_root):
    return {name: convert(qwen2_dir, qwen2_root / name, **options).output_dir for name, options in VARIANTS.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_conversion_is_exact_on_real_text(converted, reference, variant):
    for attn in ("sdpa", "eager"):
        model = load_converted(converted[variant], attn=attn)
        assert model.config.model_type.startswith("netmorph_diff") and model.config.num_hidden_layers == 24
        with torch.no_grad():
            for ids, expected in zip(reference["texts"], reference[attn]):
                diff = (model(ids).logits - expected).abs().max().item()
                assert diff <= 1e-4, f"{variant}/{attn}: max |Δlogit| {diff:.3e}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_conversion_in_bf16_equals_the_original_in_bf16(converted, reference, variant):
    model = load_converted(converted[variant], torch.bfloat16)
    with torch.no_grad():
        for ids, expected in zip(reference["texts"], reference["bf16"]):
            got = model(ids).logits
            assert got.dtype == torch.bfloat16 and torch.equal(got, expected), \
                f"{variant}: bf16 max |Δlogit| {(got.float() - expected.float()).abs().max().item():.3e}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_generation_with_the_kv_cache_equals_the_original(converted, reference, variant):
    model = load_converted(converted[variant])
    ids, mask = reference["prompt_ids"], reference["prompt_mask"]
    cached = greedy(model, ids, mask)
    assert torch.equal(cached, reference["greedy"]), f"{variant}: greedy text differs from the original's"
    assert torch.equal(greedy(model, ids, mask, use_cache=False), cached)


def test_growth_is_exact_on_real_text(qwen2_dir, tmp_path, reference):
    directory = tmp_path / "grown"
    grow(str(qwen2_dir), directory, GrowOptions.build(verify=False, **GROWTH))
    model = load_original(directory)
    for key, value in GROWTH.items():
        if key != "new_layers_at":
            assert getattr(model.config, key.replace("num_layers", "num_hidden_layers")) == value
    ids = reference["texts"][0]
    with torch.no_grad():
        diff32 = (model(ids).logits - reference["sdpa"][0]).abs().max().item()
    generated = greedy(model, reference["prompt_ids"], reference["prompt_mask"])
    del model
    with torch.no_grad():
        diff64 = (load_original(directory, torch.float64)(ids).logits - reference["float64"]).abs().max().item()
    print(f"grown: max|Δlogit| float64 {diff64:.2e}, float32 {diff32:.2e} (source's fp32 rounding "
          f"{reference['rounding']:.2e})")
    assert diff64 <= 1e-4, f"float64 max |Δlogit| {diff64:.3e}"
    assert diff32 <= 1e-4 + 2 * reference["rounding"], f"float32 max |Δlogit| {diff32:.3e}"
    assert torch.equal(generated, reference["greedy"])


def test_verify_command_passes(qwen2_dir, converted):
    result = subprocess.run(
        [sys.executable, "-m", "netmorph.cli", "verify", str(qwen2_dir), str(converted["v2"]), "--max-tokens", "64",
         "--new-tokens", "6", "--prompt", PROMPTS[0], "--prompt", PROMPTS[2]],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout and "greedy 'def fibonacci(n):': match" in result.stdout
