"""DIFF V2 conversion tensors on integer-coded weights: pairing, GQA groups, exactness of the 2·(a − 0.5a) trick."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netmorph.ops.diff_v2 import convert_attention_tensors_v2, paired_query


def test_paired_query_rows():
    heads, d, hidden = 3, 2, 4
    # row value = 100·head + 10·row_in_head + column: a misplaced row shows
    weight = torch.tensor([[100 * h + 10 * r + c for c in range(hidden)] for h in range(heads) for r in range(d)],
                          dtype=torch.float32)
    bias = torch.tensor([100 * h + 10 * r for h in range(heads) for r in range(d)], dtype=torch.float32)
    new_weight, new_bias = paired_query(weight, bias, d)
    assert new_weight.shape == (2 * heads * d, hidden)
    for i in range(2 * heads):
        assert torch.equal(new_weight[i * d:(i + 1) * d], weight[(i // 2) * d:(i // 2 + 1) * d])
        assert torch.equal(new_bias[i * d:(i + 1) * d], bias[(i // 2) * d:(i // 2 + 1) * d])


@settings(max_examples=40, deadline=None)
@given(kv=st.integers(1, 4), group=st.integers(1, 4), d=st.sampled_from([2, 4, 8]), seed=st.integers(0, 2**16))
def test_converted_layer_is_bitwise_the_source_layer(kv, group, d, seed):
    """Attention over 2H paired query heads with λ = sigmoid(0) and o_proj × 2 equals the source attention bitwise."""
    heads, hidden, length = kv * group, 16, 5
    g = torch.Generator().manual_seed(seed)
    attn = {"q_proj.weight": torch.randn(heads * d, hidden, generator=g),
            "k_proj.weight": torch.randn(kv * d, hidden, generator=g),
            "v_proj.weight": torch.randn(kv * d, hidden, generator=g),
            "o_proj.weight": torch.randn(hidden, heads * d, generator=g)}
    out = convert_attention_tensors_v2(attn, heads, d)
    x = torch.randn(length, hidden, generator=g)

    def attend(q_weight, num_q):
        # one matmul per head: the source and the paired heads are computed by the same BLAS calls on equal shapes
        q = torch.stack([x @ q_weight[h * d:(h + 1) * d].T for h in range(num_q)])  # (heads, T, d)
        k = (x @ attn["k_proj.weight"].T).view(length, kv, d).transpose(0, 1).repeat_interleave(num_q // kv, 0)
        v = (x @ attn["v_proj.weight"].T).view(length, kv, d).transpose(0, 1).repeat_interleave(num_q // kv, 0)
        mask = torch.ones(length, length, dtype=torch.bool).tril()
        scores = (q @ k.transpose(-1, -2) / d**0.5).masked_fill(~mask, float("-inf"))
        return (scores.softmax(-1) @ v).transpose(0, 1)  # (T, heads, d)

    source = attend(attn["q_proj.weight"], heads).reshape(length, -1) @ attn["o_proj.weight"].T
    both = attend(out["q_proj.weight"], 2 * heads)
    lam = torch.sigmoid(x @ out["lambda_proj.weight"].T)  # (T, H) = 0.5
    combined = both[:, 0::2] - lam.unsqueeze(-1) * both[:, 1::2]
    converted = combined.reshape(length, -1) @ out["o_proj.weight"].T
    assert torch.equal(lam, torch.full_like(lam, 0.5))
    # 0.5·a and 2·W are exact scalings and a − 0.5·a = 0.5·a exactly, so every product and sum is the source's.
    assert torch.equal(converted, source), (converted - source).abs().max()
