"""Tiny random models of the stock transformers classes, built in code (no downloads)."""

import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import netmorph.auto  # noqa: F401  (registers the converted model classes)
from netmorph.surgery.diff import convert_diff_transformer
from netmorph.options import ConvertOptions

FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM)}

# Odd GQA like SmolLM2 (9 query / 3 KV heads) and head_dim 8 ≠ hidden/heads (4).
BASE = dict(vocab_size=97, hidden_size=36, intermediate_size=56, num_hidden_layers=2, num_attention_heads=9,
            num_key_value_heads=3, head_dim=8, max_position_embeddings=128, initializer_range=0.2,
            rms_norm_eps=1e-5, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILY_EXTRAS = {
    "llama": dict(attention_bias=True),
    "mistral": dict(sliding_window=7),
    "qwen2": dict(use_sliding_window=True, sliding_window=7, max_window_layers=1),
}


def tiny_config(family: str, **overrides):
    config_class, _ = FAMILIES[family]
    return config_class(**{**BASE, **FAMILY_EXTRAS[family], **overrides})


def save_tiny_model(directory: Path, family: str, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    _, model_class = FAMILIES[family]
    model = model_class(tiny_config(family, **overrides))
    with torch.no_grad():  # non-trivial norm gains and biases, so a dropped tensor shows in the logits
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param) if "norm" in name else 0.3 * torch.randn_like(param))
    model.save_pretrained(directory)
    return directory


def load(path, attn_implementation="eager"):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation=attn_implementation).eval()


def convert(source, output_dir, **options):
    options.setdefault("verify", False)
    return convert_diff_transformer(str(source), output_dir, ConvertOptions.build(**options))


def random_ids(vocab_size=97, batch=2, length=24, seed=0):
    return torch.randint(3, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_logit_diff(model_a, model_b, ids, **kwargs) -> float:
    a = model_a(ids, use_cache=False, **kwargs).logits
    b = model_b(ids, use_cache=False, **kwargs).logits
    return (a - b).abs().max().item()


def cache_argument(model, cache) -> dict:
    """{name: cache} under the name the installed transformers' forward takes: `cache` since 5.24 (which still
    accepts `past_key_values` until 5.40), `past_key_values` before."""
    import inspect

    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def save_char_tokenizer(directory: Path) -> Path:
    """A real character-level tokenizer for the tiny models' 97-token vocabulary: 0 <unk>/pad, 1 <s>, 2 </s>, then
    the 94 printable ASCII characters ' '..'}'; newlines read as spaces."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {chr(c): 3 + i for i, c in enumerate(range(32, 126))}
    assert len(vocab) == BASE["vocab_size"]
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(Regex(r"\s"), " ")
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(directory)
    return directory


def require_free_space(directory, needed: int) -> None:
    """Fail at once, naming the fix, when the temp dir has less than `needed` bytes free (instead of test by test
    with ENOSPC)."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        pytest.fail(f"{free / 2**30:.1f} GiB free under {directory.parent}; the real-model tests need "
                    f"{needed / 2**30:.0f} GiB: free space there or set TMPDIR to a larger disk", pytrace=False)
