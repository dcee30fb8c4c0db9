"""The conversion math on integer-coded tensors: each row/column's value says where it came from."""

import pytest
import torch

from netmorph.ops.diff_attention import (
    DiffAttentionRecipe,
    convert_attention_tensors,
    doubled_projection,
    lambda_tensors,
    split_layout_o_proj,
)


def coded(rows, cols):
    return torch.arange(rows * cols, dtype=torch.float32).view(rows, cols)


def test_doubled_projection_puts_source_rows_first_and_keeps_bias():
    weight, bias = coded(6, 4), torch.arange(6.0)
    generator = torch.Generator().manual_seed(0)
    for init in ("normal", "zero", "mirror"):
        new_weight, new_bias = doubled_projection(weight, bias, init, 0.02, generator)
        assert new_weight.shape == (12, 4) and new_bias.shape == (12,)
        assert torch.equal(new_weight[:6], weight) and torch.equal(new_bias[:6], bias)
    assert torch.equal(doubled_projection(weight, bias, "mirror", 0.02, generator)[0][6:], weight)
    assert torch.equal(doubled_projection(weight, bias, "mirror", 0.02, generator)[1][6:], bias)
    assert not doubled_projection(weight, bias, "zero", 0.02, generator)[0][6:].any()
    noise = doubled_projection(weight, None, "normal", 0.02, generator)[0][6:]
    assert 0.01 < noise.std().item() < 0.03 and abs(noise.mean().item()) < 0.02


def test_split_layout_o_proj_regroups_columns_by_head_pairs():
    hidden, heads, d = 3, 4, 2
    o_weight = torch.arange(heads * d, dtype=torch.float32).expand(hidden, -1)  # column c holds value c
    regrouped = split_layout_o_proj(o_weight, heads, d)
    # differential head 0 reads source heads 0 and 2 (H/2 = 2); head 1 reads source heads 1 and 3
    assert regrouped[0].tolist() == [0, 1, 4, 5, 2, 3, 6, 7]


def test_lambda_zero_start_is_exactly_zero_and_trainable():
    tensors = lambda_tensors(5, 64, "zero", 0.1, torch.Generator().manual_seed(0), torch.float32)
    q1, k1, q2, k2 = (tensors[n].clone().requires_grad_() for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"))
    lam = torch.exp((q1 * k1).sum()) - torch.exp((q2 * k2).sum()) + tensors["lambda_init"]
    assert lam.item() == 0.0 and tensors["mix"].item() == 0.0
    lam.backward()
    assert all(v.grad.abs().max() > 0 for v in (q1, k1, q2, k2))


def test_lambda_paper_start_uses_paper_lambda_init():
    tensors = lambda_tensors(3, 8, "paper", 0.1, torch.Generator().manual_seed(0), torch.float32)
    assert abs(tensors["lambda_init"].item() - (0.8 - 0.6 * torch.exp(torch.tensor(-0.9)).item())) < 1e-7
    assert not torch.equal(tensors["lambda_q1"], tensors["lambda_q2"])


def test_convert_attention_tensors_leaves_v_and_o_alone_in_doubled_layout():
    attn = {"q_proj.weight": coded(8, 6), "k_proj.weight": coded(4, 6), "v_proj.weight": coded(4, 6),
            "o_proj.weight": coded(6, 8), "q_proj.bias": torch.arange(8.0)}
    out = convert_attention_tensors(attn, 0, 4, 2, DiffAttentionRecipe(sublayer_norm=True), torch.Generator())
    assert out["v_proj.weight"] is attn["v_proj.weight"] and out["o_proj.weight"] is attn["o_proj.weight"]
    assert out["q_proj.weight"].shape == (16, 6) and out["k_proj.weight"].shape == (8, 6)
    assert torch.equal(out["q_proj.bias"][:8], attn["q_proj.bias"])
    assert torch.equal(out["subln.weight"], torch.ones(2))


def test_finiteness_check_survives_a_sum_that_overflows_and_names_the_bad_values():
    from netmorph.errors import NetmorphError
    from netmorph.io.reader import check_finite

    large = torch.full((100,), 60000.0, dtype=torch.float16)  # finite, but its fp16 sum overflows
    assert check_finite("large", large) is large
    large[7], large[9] = float("inf"), float("nan")
    with pytest.raises(NetmorphError, match="tensor large holds 1 NaN and 1 Inf values"):
        check_finite("large", large)


def test_ops_import_no_transformers():
    """The pure tensor functions import torch (and netmorph.errors) only: no modeling code, no transformers."""
    import subprocess
    import sys

    code = ("import sys, netmorph.ops.diff_attention, netmorph.ops.diff_v2, netmorph.ops.diffllama, "
            "netmorph.ops.grow, netmorph.ops.qkv_layout; print('transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stdout + result.stderr


def test_the_modeling_files_lambda_init_is_the_converters():
    from netmorph.modeling.modeling_netmorph_diff import paper_lambda_init as modeling
    from netmorph.ops.diff_attention import paper_lambda_init as ops

    assert all(modeling(layer) == ops(layer) for layer in range(128))
