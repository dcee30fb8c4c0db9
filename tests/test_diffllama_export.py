"""`convert-diff-transformer --export diffllama`: a stock transformers DiffLlama checkpoint (no remote code).

Approximate by construction (DiffLlama's per-head RMSNorm always runs); these tests check the layout math on
integer-coded tensors, that λ = 0, that the checkpoint loads in the stock class, and that the divergence the
command reports is what a test measures on its own."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DiffLlamaForCausalLM

from netmorph.errors import NetmorphError
from netmorph.ops.diffllama import (
    anchored_value,
    diffllama_attention_tensors,
    diffllama_lambda,
    interleaved_o_proj,
    zero_lambda_vectors,
)
from netmorph.sources import default_texts, resolve_source
from tests.helpers import cache_argument, convert, random_ids, save_char_tokenizer, save_tiny_model

pytestmark = pytest.mark.compat  # also run against the oldest and newest transformers (tests/compat.py)


def test_lambda_construction_is_zero_in_fp32():
    for layer_idx in range(128):
        for head_dim in (8, 64, 128):
            vectors = zero_lambda_vectors(layer_idx, head_dim, torch.float32)
            assert abs(diffllama_lambda(vectors, layer_idx).item()) <= 1e-6


def test_o_proj_columns_are_interleaved_per_head():
    hidden, heads, d = 3, 4, 2
    o_weight = torch.arange(hidden * heads * d, dtype=torch.float32).reshape(hidden, heads * d)
    out = interleaved_o_proj(o_weight, heads, d, scale=2.0)
    assert out.shape == (hidden, 2 * heads * d)
    for j in range(heads):
        assert torch.equal(out[:, j * 2 * d: j * 2 * d + d], 2 * o_weight[:, j * d: (j + 1) * d])
        assert not out[:, j * 2 * d + d: (j + 1) * 2 * d].any()


def test_value_anchor_rows():
    weight = torch.arange(12, dtype=torch.float32).reshape(4, 3) + 1
    bias = torch.arange(4, dtype=torch.float32)
    new_weight, new_bias = anchored_value(weight, bias, 7.0)
    assert torch.equal(new_weight[:4], weight) and not new_weight[4:].any()
    assert torch.equal(new_bias, torch.tensor([0.0, 1, 2, 3, 7, 7, 7, 7]))
    _, no_bias = anchored_value(weight, None, 7.0)
    assert torch.equal(no_bias, torch.tensor([0.0, 0, 0, 0, 7, 7, 7, 7]))


def test_layer_tensors_keep_the_source_rows_first():
    heads, kv, d, hidden = 4, 2, 3, 5
    attn = {"q_proj.weight": torch.randn(heads * d, hidden), "k_proj.weight": torch.randn(kv * d, hidden),
            "v_proj.weight": torch.randn(kv * d, hidden), "o_proj.weight": torch.randn(hidden, heads * d),
            "q_proj.bias": torch.randn(heads * d)}
    out = diffllama_attention_tensors(attn, 3, heads, d, 100.0, 1e-5, "normal", 0.02, torch.Generator().manual_seed(0))
    assert torch.equal(out["q_proj.weight"][: heads * d], attn["q_proj.weight"])
    assert torch.equal(out["q_proj.bias"][: heads * d], attn["q_proj.bias"])
    assert not out["k_proj.bias"].any() and not out["o_proj.bias"].any()
    assert out["k_proj.weight"].shape == (2 * kv * d, hidden) and out["o_proj.weight"].shape == (hidden, 2 * heads * d)
    assert set(out) >= {"lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"}


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffllama")
    # Qwen2-style q/k/v biases without an o bias, GQA, head_dim ≠ hidden / heads; no sliding window.
    source = save_tiny_model(root / "qwen2", "qwen2", num_attention_heads=4, num_key_value_heads=2,
                             use_sliding_window=False, tie_word_embeddings=False)
    save_char_tokenizer(source)
    return source


def _export(source, out, **options):
    return convert(source, out, **{"export": "diffllama", "verify": True, **options})


@torch.no_grad()
def test_export_loads_in_the_stock_class_and_reports_its_own_divergence(tiny_source, tmp_path):
    result = _export(tiny_source, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "diffllama" and "auto_map" not in config
    assert not list((tmp_path / "out").glob("*.py"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                    attn_implementation="sdpa").eval()
    assert type(exported) is DiffLlamaForCausalLM
    for layer in exported.model.layers:
        attention = layer.self_attn
        vectors = {name: getattr(attention, name) for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}
        assert abs(diffllama_lambda(vectors, attention.layer_idx).item()) <= 1e-6

    [report] = result.reports
    assert report.approximate
    original = resolve_source(str(tiny_source), allow_pickle=False, trust_remote_code=False).load_model("sdpa")
    tokenizer = resolve_source(str(tiny_source), allow_pickle=False, trust_remote_code=False).load_tokenizer()
    context = original.config.max_position_embeddings  # 128 < 512: the report cuts the texts to the context
    for reported, (name, text) in zip(report.texts, default_texts().items()):
        # The report's figures, recomputed here without netmorph's comparison code.
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :context]
        assert reported.tokens == ids.shape[1] == context
        logits_a, logits_b = original(ids).logits[0], exported(ids).logits[0]
        assert (logits_a - logits_b).abs().max().item() == pytest.approx(reported.max_abs_logit_diff, rel=1e-4,
                                                                         abs=1e-7)
        for logits, loss in ((logits_a, reported.loss_original), (logits_b, reported.loss_converted)):
            assert torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item() == pytest.approx(loss, rel=1e-6)
    assert "approximate mode, measured divergence" in (tmp_path / "out" / "README.md").read_text()
    # The anchor keeps the norm nearly linear: close to the source.
    assert report.max_abs_logit_diff < 1e-2


@torch.no_grad()
def test_anchor_zero_is_the_plain_construction_and_diverges_more(tiny_source, tmp_path):
    anchored = _export(tiny_source, tmp_path / "anchored", diffllama_anchor=1000.0).reports[0]
    plain = _export(tiny_source, tmp_path / "plain", diffllama_anchor=0.0).reports[0]
    assert anchored.max_abs_logit_diff < 1e-3 < plain.max_abs_logit_diff
    assert anchored.max_abs_loss_delta < plain.max_abs_loss_delta


@torch.no_grad()
def test_exported_model_decodes_with_its_kv_cache(tiny_source, tmp_path):
    _export(tiny_source, tmp_path / "out", verify=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = random_ids(length=12)
    full = model(ids).logits[:, -1]
    prefix = model(ids[:, :-1], use_cache=True)
    step = model(ids[:, -1:], **cache_argument(model, prefix.past_key_values)).logits[:, -1]
    assert torch.allclose(full, step, atol=1e-5)


def test_refuses_what_diffllama_cannot_represent(tmp_path):
    mistral = save_tiny_model(tmp_path / "mistral", "mistral")  # sliding_window = 7
    with pytest.raises(NetmorphError, match="cannot represent sliding-window attention"):
        _export(mistral, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    llama = save_tiny_model(tmp_path / "llama", "llama", mlp_bias=True)
    with pytest.raises(NetmorphError, match="cannot represent MLP biases"):
        _export(llama, tmp_path / "out")
    with pytest.raises(NetmorphError, match="--split-heads does not apply to --export diffllama"):
        _export(llama, tmp_path / "out", split_heads=True)
    assert not (tmp_path / "out").exists()


def test_anchor_makes_the_per_head_norm_nearly_linear():
    """(1 − λ_init)·RMSNorm([a ‖ anchor]) times the o_proj scale gives back a, to a relative error ≈ mean(a²)/anchor²."""
    from netmorph.modeling.modeling_netmorph_diff import paper_lambda_init
    from netmorph.ops.diffllama import o_proj_scale

    layer_idx, eps, d = 5, 1e-5, 64
    a = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for anchor in (10.0, 100.0, 1000.0):
        head = torch.cat([a, torch.full((d,), anchor, dtype=torch.float64)])
        normed = (1 - paper_lambda_init(layer_idx)) * torch.nn.functional.rms_norm(head, (2 * d,), eps=eps)
        recovered = normed[:d] * o_proj_scale(layer_idx, anchor, eps)
        relative = ((recovered - a).abs().max() / a.abs().max()).item()
        assert relative <= (a.pow(2).mean() / anchor**2).item()
