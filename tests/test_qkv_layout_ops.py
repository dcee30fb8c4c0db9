"""The fused-QKV layout functions on integer-coded tensors: every row's value names (kind, head, row in head), so a
row in the wrong place is visible, not averaged away. The expected layouts are written as plain loops over the
index maps of qkv_mask_report.md §A2, independently of the reshapes in netmorph/ops/qkv_layout.py."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netmorph.errors import NetmorphError
from netmorph.ops.qkv_layout import FUSED_LAYOUTS, LAYOUTS, Heads, fuse, relayout, same_bytes, split

Q, K, V = 1, 2, 3
IN_FEATURES = 5


def code(kind: int, head: int, row: int) -> int:
    return kind * 1_000_000 + head * 1_000 + row


def coded_rows(kind: int, num_heads: int, head_dim: int) -> list[int]:
    return [code(kind, h, d) for h in range(num_heads) for d in range(head_dim)]


def as_weight(codes: list[int]) -> torch.Tensor:
    """Rows [out, in]: column c of a row holds its code · 8 + c, so a transposed or shuffled column shows too."""
    column = torch.arange(IN_FEATURES, dtype=torch.int64)
    return torch.tensor(codes, dtype=torch.int64)[:, None] * 8 + column[None, :]


def coded_qkv(heads: Heads, head_dim: int, bias: bool = False):
    rows = (coded_rows(Q, heads.num_heads, head_dim), coded_rows(K, heads.num_kv_heads, head_dim),
            coded_rows(V, heads.num_kv_heads, head_dim))
    return tuple(torch.tensor(r, dtype=torch.int64) if bias else as_weight(r) for r in rows)


def expected_codes(layout: str, heads: Heads, head_dim: int) -> list[int]:
    """The row order of a fused layout, head by head, as the modeling code reads it."""
    block = lambda kind, head: [code(kind, head, d) for d in range(head_dim)]
    if layout == "sequential":
        return (coded_rows(Q, heads.num_heads, head_dim) + coded_rows(K, heads.num_kv_heads, head_dim)
                + coded_rows(V, heads.num_kv_heads, head_dim))
    if layout == "interleaved":  # GPT-NeoX: view(..., H, 3, D)
        return [c for h in range(heads.num_heads) for kind in (Q, K, V) for c in block(kind, h)]
    rows = []  # grouped (Falcon new decoder): view(..., G, r + 2, D)
    for g in range(heads.num_kv_heads):
        for j in range(heads.per_group):
            rows += block(Q, g * heads.per_group + j)
        rows += block(K, g) + block(V, g)
    return rows


CONFIGS = [Heads(4, 4), Heads(6, 2), Heads(4, 1), Heads(1, 1), Heads(9, 3)]


# Every (layout, heads) the layout can express: interleaved needs G == H (its refusal is tested below).
EXPRESSIBLE = [pytest.param(layout, heads, id=f"{layout}-H{heads.num_heads}G{heads.num_kv_heads}")
               for layout in FUSED_LAYOUTS for heads in CONFIGS
               if layout != "interleaved" or heads.num_kv_heads == heads.num_heads]


@pytest.mark.parametrize(("layout", "heads"), EXPRESSIBLE)
def test_fused_rows_sit_where_the_modeling_code_reads_them(layout, heads):
    head_dim = 3
    fused = fuse(*coded_qkv(heads, head_dim), layout, heads)
    assert torch.equal(fused, as_weight(expected_codes(layout, heads, head_dim)))
    fused_bias = fuse(*coded_qkv(heads, head_dim, bias=True), layout, heads)
    assert fused_bias.tolist() == expected_codes(layout, heads, head_dim)


@pytest.mark.parametrize(("layout", "heads"), EXPRESSIBLE)
def test_split_is_the_inverse_of_fuse(layout, heads):
    for bias in (False, True):
        parts = coded_qkv(heads, 3, bias)
        back = split(fuse(*parts, layout, heads), layout, heads)
        assert all(torch.equal(a, b) and b.is_contiguous() for a, b in zip(parts, back))


def test_falcon_multi_query_is_sequential_and_grouped_with_one_group():
    """Falcon-7B (multi_query): view(..., H + 2, D), q = [:-2], k = [-2], v = [-1] — sequential and grouped agree."""
    heads, head_dim = Heads(4, 1), 2
    parts = coded_qkv(heads, head_dim)
    assert torch.equal(fuse(*parts, "sequential", heads), fuse(*parts, "grouped", heads))
    falcon = torch.cat([parts[0].reshape(4, head_dim, -1), parts[1][None], parts[2][None]]).reshape(-1, IN_FEATURES)
    assert torch.equal(fuse(*parts, "grouped", heads), falcon)
    assert same_bytes("sequential", "grouped", heads) and not same_bytes("sequential", "grouped", Heads(4, 2))


def test_interleaved_is_grouped_when_every_head_has_its_own_kv():
    heads = Heads(5, 5)
    parts = coded_qkv(heads, 2)
    assert torch.equal(fuse(*parts, "interleaved", heads), fuse(*parts, "grouped", heads))
    assert same_bytes("interleaved", "grouped", heads) and not same_bytes("interleaved", "sequential", heads)


def test_gpt2_conv1d_weight_is_sequential_along_columns():
    """GPT-2's Conv1D stores c_attn as [in, 3E]: transposed, its rows are the sequential layout."""
    heads, head_dim = Heads(3, 3), 2
    q, k, v = coded_qkv(heads, head_dim)
    conv1d = torch.cat([q.T, k.T, v.T], dim=1)  # what Conv1D's x @ W + b reads: columns [Q | K | V]
    assert torch.equal(conv1d.T, fuse(q, k, v, "sequential", heads))
    back = split(conv1d.T.contiguous(), "sequential", heads)
    assert torch.equal(torch.cat([p.T for p in back], dim=1), conv1d)


@pytest.mark.parametrize("heads", [Heads(4, 2), Heads(4, 1)], ids=["GQA", "MQA"])
def test_interleaved_refuses_shared_kv_heads_with_one_line(heads):
    parts = coded_qkv(heads, 2)
    with pytest.raises(NetmorphError) as error:
        fuse(*parts, "interleaved", heads)
    message = str(error.value)
    assert "\n" not in message and "interleaved" in message and "--to grouped" in message
    with pytest.raises(NetmorphError):
        split(fuse(*parts, "grouped", heads), "interleaved", heads)


def test_bad_head_counts_and_shapes_are_one_line_errors():
    with pytest.raises(NetmorphError, match="multiple of the key/value heads"):
        Heads(6, 4)
    with pytest.raises(NetmorphError, match="do not belong together"):
        split(torch.zeros(10, 3), "sequential", Heads(2, 1))  # 10 rows is not (2 + 2)·D
    q, k, v = coded_qkv(Heads(4, 2), 2)
    with pytest.raises(NetmorphError, match="do not belong together"):
        fuse(q, k[:2], v[:2], "sequential", Heads(4, 2))
    with pytest.raises(NetmorphError, match="unknown QKV layout"):
        fuse(q, k, v, "zigzag", Heads(4, 2))


@st.composite
def head_configs(draw):
    num_kv_heads = draw(st.integers(1, 6))
    heads = Heads(num_kv_heads * draw(st.integers(1, 4)), num_kv_heads)
    return heads, draw(st.integers(1, 5)), draw(st.integers(1, 4))


@settings(max_examples=150, deadline=None)
@given(head_configs(), st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS), st.booleans(), st.integers(0, 2**31))
def test_every_conversion_round_trips_bit_exactly(config, source, target, bias, seed):
    """Random float weights or biases, any source → target → source: the same bits (a permutation loses nothing),
    and the target agrees with fusing the original q/k/v directly."""
    heads, head_dim, in_features = config
    if "interleaved" in (source, target) and heads.num_kv_heads != heads.num_heads:
        with pytest.raises(NetmorphError, match="--to grouped"):
            relayout(relayout(coded_qkv(heads, head_dim, bias), "separate", source, heads), source, target, heads)
        return
    generator = torch.Generator().manual_seed(seed)
    shape = lambda rows: (rows,) if bias else (rows, in_features)
    qkv = tuple(torch.randn(shape(n * head_dim), generator=generator)
                for n in (heads.num_heads, heads.num_kv_heads, heads.num_kv_heads))
    start = relayout(qkv, "separate", source, heads)
    converted = relayout(start, source, target, heads)
    assert all(torch.equal(a, b) for a, b in zip(converted, relayout(qkv, "separate", target, heads)))
    back = relayout(converted, target, source, heads)
    assert len(back) == len(start) and all(torch.equal(a, b) for a, b in zip(back, start))
    if source != "separate" and target != "separate":  # same_bytes says when a conversion moves no row at all
        assert same_bytes(source, target, heads) == torch.equal(start[0], converted[0])


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 1), (6, 3), (3, 3)])
def test_grouped_layout_is_falcons_per_group_rows(heads, kv_heads):
    """Falcon new_decoder_architecture rows, written out by hand: per KV group g, [q heads of g; k_g; v_g]."""
    d, n, r = 2, 3, heads // kv_heads
    qkv = torch.arange((heads + 2 * kv_heads) * d * n, dtype=torch.float64).view(-1, n)
    q, k, v = split(qkv, "grouped", Heads(heads, kv_heads))
    block = (r + 2) * d
    for h in range(heads):
        g, j = divmod(h, r)
        assert torch.equal(q[h * d:(h + 1) * d], qkv[g * block + j * d:g * block + (j + 1) * d])
    for g in range(kv_heads):
        assert torch.equal(k[g * d:(g + 1) * d], qkv[g * block + r * d:g * block + (r + 1) * d])
        assert torch.equal(v[g * d:(g + 1) * d], qkv[g * block + (r + 1) * d:(g + 1) * block])
    assert torch.equal(fuse(q, k, v, "grouped", Heads(heads, kv_heads)), qkv)
