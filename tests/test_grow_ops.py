"""The growth recipes as pure functions: integer-coded layouts, and small hand-written reference computations
(RoPE attention, RMSNorm, LayerNorm, SwiGLU, GQA) that must give the same numbers before and after growth."""

import math

import pytest
import torch
import torch.nn.functional as F

from netmorph.errors import NetmorphError
from netmorph.ops import grow as ops

D = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed), dtype=D)


# ── layouts on integer-coded tensors ────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "old, new, positions, kv_sources",
    [
        ((9, 3), (12, 4), list(range(9)), [0, 1, 2, None]),  # SmolLM2 9/3 → 12/4: one new group appended
        ((9, 3), (9, 9), list(range(9)), [0, 0, 0, 1, 1, 1, 2, 2, 2]),  # KV heads duplicated, queries stay
        ((4, 2), (8, 2), [0, 1, 4, 5], [0, 1]),  # wider groups: new queries at the end of each group
        ((2, 1), (4, 2), [0, 1], [0, None]),
        ((4, 1), (8, 4), [0, 1, 2, 3], [0, 0, None, None]),  # MQA: the one KV head copied twice
    ],
)
def test_head_placement(old, new, positions, kv_sources):
    assert ops.head_placement(*old, *new) == (positions, kv_sources)


def test_head_placement_impossible_names_the_fix():
    with pytest.raises(NetmorphError, match="query heads per KV head"):
        ops.head_placement(6, 2, 6, 3)


def test_qk_dim_positions_keep_rotate_half_pairs():
    assert ops.qk_dim_positions(4, 6, rotary_dims=4) == [0, 1, 3, 4]  # [x1, pad, x2, pad]
    assert ops.qk_dim_positions(4, 8, rotary_dims=4) == [0, 2, 4, 6]  # pair i → pair 2i
    assert ops.qk_dim_positions(8, 10, rotary_dims=2) == list(range(8))  # partial: pad the pass-through end
    for d, d2 in ((8, 10), (8, 24), (6, 14)):
        pos = ops.qk_dim_positions(d, d2, d)
        assert all(pos[i + d // 2] == pos[i] + d2 // 2 for i in range(d // 2))


def test_new_layer_zeroes_only_the_writers():
    layer = {"q.weight": randn(4, 3), "o.weight": randn(3, 4), "o.bias": randn(3), "up.weight": randn(5, 3),
             "gate.weight": randn(5, 3), "down.weight": randn(3, 5), "attn_norm.weight": randn(3)}
    copied = ops.new_layer(layer, "copy", gen())
    fresh = ops.new_layer(layer, "normal", gen())
    for name in layer:
        writer = name.split(".")[0] in ops.WRITERS
        assert not copied[name].any() if writer else torch.equal(copied[name], layer[name])
        if not writer:
            assert fresh[name].abs().min() > 0
    assert not torch.equal(fresh["q.weight"], layer["q.weight"]) and torch.equal(fresh["attn_norm.weight"], layer["attn_norm.weight"])


# ── small reference computations ────────────────────────────────────────────────────────────────────────────────


def swiglu(layer, x):
    return F.linear(F.silu(F.linear(x, layer["gate.weight"])) * F.linear(x, layer["up.weight"]), layer["down.weight"])


def test_grow_mlp_is_exact_and_no_neuron_is_dead():
    layer = {"gate.weight": randn(6, 4), "up.weight": randn(6, 4, seed=1), "down.weight": randn(4, 6, seed=2)}
    grown = ops.grow_mlp(layer, 9, gen())
    x = randn(7, 4, seed=3)
    torch.testing.assert_close(swiglu(grown, x), swiglu(layer, x), rtol=0, atol=1e-12)
    assert grown["gate.weight"][6:].abs().min() > 0 and grown["up.weight"][6:].abs().min() > 0
    assert not grown["down.weight"][:, 6:].any()


def rope(x, theta, rotary_dims):
    """Rotate-half RoPE on the first `rotary_dims` dims of (T, d), as transformers computes it."""
    t = torch.arange(x.shape[0], dtype=D)[:, None]
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dims, 2, dtype=D) / rotary_dims)
    angles = torch.cat([t * inv_freq, t * inv_freq], dim=-1)
    rot, rest = x[:, :rotary_dims], x[:, rotary_dims:]
    half = rotary_dims // 2
    rotated = torch.cat([-rot[:, half:], rot[:, :half]], dim=-1)
    return torch.cat([rot * angles.cos() + rotated * angles.sin(), rest], dim=-1)


def attention(layer, x, heads, kv_heads, d, theta, rotary_dims):
    """Causal GQA attention with RoPE and 1/√d scaling: (T, n) → (T, n)."""
    q = F.linear(x, layer["q.weight"], layer.get("q.bias")).view(-1, heads, d)
    k = F.linear(x, layer["k.weight"], layer.get("k.bias")).view(-1, kv_heads, d)
    v = F.linear(x, layer["v.weight"], layer.get("v.bias")).view(-1, kv_heads, d)
    group = heads // kv_heads
    outs = []
    for h in range(heads):
        qh, kh = rope(q[:, h], theta, rotary_dims), rope(k[:, h // group], theta, rotary_dims)
        scores = qh @ kh.T / math.sqrt(d) + torch.full((len(x), len(x)), -math.inf, dtype=D).triu(1)
        outs.append(scores.softmax(-1) @ v[:, h // group])
    return F.linear(torch.cat(outs, dim=-1), layer["o.weight"], layer.get("o.bias"))


def attention_layer(heads, kv_heads, d, n, seed=0):
    names = {"q": heads * d, "k": kv_heads * d, "v": kv_heads * d}
    layer = {f"{r}.weight": randn(rows, n, seed=seed + i) for i, (r, rows) in enumerate(names.items())}
    layer.update({f"{r}.bias": randn(rows, seed=seed + 10 + i) for i, (r, rows) in enumerate(names.items())})
    layer["o.weight"] = randn(n, heads * d, seed=seed + 20)
    return layer


@pytest.mark.parametrize("old, new", [((9, 3), (12, 4)), ((9, 3), (9, 9)), ((4, 2), (8, 2)), ((4, 1), (8, 4))])
def test_regroup_heads_is_exact(old, new):
    d, n = 4, 6
    layer = attention_layer(*old, d, n)
    grown = ops.regroup_heads(layer, *old, d, *new, gen())
    x = randn(5, n, seed=99)
    expected = attention(layer, x, *old, d, 10_000.0, d)
    torch.testing.assert_close(attention(grown, x, *new, d, 10_000.0, d), expected, rtol=0, atol=1e-12)
    assert grown["q.weight"].abs().min() > 0  # new query heads are random, their o_proj columns carry the zero


@pytest.mark.parametrize("d, d2, rotary", [(8, 12, 8), (8, 16, 8), (8, 24, 8), (8, 10, 2), (8, 12, 4)])
def test_grow_head_dim_keeps_rope_attention(d, d2, rotary):
    heads, kv_heads, n, theta = 4, 2, 6, 10_000.0
    layer = attention_layer(heads, kv_heads, d, n)
    grown = ops.grow_head_dim(layer, heads, kv_heads, d, d2, rotary, gen())
    if rotary == d:  # full rotary: θ′ = θ^(d′/d) unless d′ is a multiple (pairs remapped, θ kept)
        new_theta, new_rotary = (theta if d2 % d == 0 else theta ** (d2 / d)), d2
    else:  # partial: frequencies over the same r dims; prf′ = (r + ½)/d′ gives int(d′·prf′) = r
        new_theta, new_rotary = theta, int(d2 * (rotary + 0.5) / d2)
    x = randn(5, n, seed=99)
    expected = attention(layer, x, heads, kv_heads, d, theta, rotary)
    torch.testing.assert_close(attention(grown, x, heads, kv_heads, d2, new_theta, new_rotary), expected,
                               rtol=0, atol=1e-10)


def test_padding_at_the_end_of_a_full_rotary_head_is_wrong():
    """Why `qk_dim_positions` exists: naive end-padding breaks rotate-half pairs (report: Δ 0.57)."""
    heads, kv_heads, d, d2, n = 2, 2, 8, 12, 6
    layer = attention_layer(heads, kv_heads, d, n)
    grown = ops.grow_head_dim(layer, heads, kv_heads, d, d2, d, gen())
    naive = dict(grown)
    for role in ("q", "k"):
        w = layer[f"{role}.weight"].view(heads, d, n) * (math.sqrt(d2 / d) if role == "q" else 1)
        naive[f"{role}.weight"] = torch.cat([w, torch.zeros(heads, d2 - d, n, dtype=D)], 1).view(-1, n)
        b = layer[f"{role}.bias"].view(heads, d) * (math.sqrt(d2 / d) if role == "q" else 1)
        naive[f"{role}.bias"] = torch.cat([b, torch.zeros(heads, d2 - d, dtype=D)], 1).view(-1)
    x = randn(5, n, seed=99)
    expected = attention(layer, x, heads, kv_heads, d, 10_000.0, d)
    assert (attention(naive, x, heads, kv_heads, d2, 10_000.0 ** (d2 / d), d2) - expected).abs().max() > 1e-3


def rms_norm(x, weight, eps, one_plus=False):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * ((1 + weight) if one_plus else weight)


@pytest.mark.parametrize("kind", ["rms", "rms_one_plus", "layer"])
def test_grow_norm_exact_on_the_grown_residual(kind):
    n, n2, eps = 6, 10, 1e-2  # a large eps, so the eps × n/n′ correction shows
    x = randn(4, n) + 0.7
    weight, bias = randn(n, seed=1), (randn(n, seed=2) if kind == "layer" else None)
    new_weight, new_bias = ops.grow_norm(weight, bias, n2, kind)
    new_eps = eps * n / n2
    if kind == "layer":  # mean-fill: the new dims carry the mean of the old ones
        x2 = torch.cat([x, x.mean(-1, keepdim=True).expand(-1, n2 - n)], -1)
        out, out2 = (F.layer_norm(x, (n,), weight, bias, eps), F.layer_norm(x2, (n2,), new_weight, new_bias, new_eps))
        naive = torch.cat([x, torch.zeros(4, n2 - n, dtype=D)], -1)
        assert (F.layer_norm(naive, (n2,), new_weight, new_bias, new_eps)[:, :n] - out).abs().max() > 1e-2
    else:
        x2 = torch.cat([x, torch.zeros(4, n2 - n, dtype=D)], -1)
        one_plus = kind == "rms_one_plus"
        out, out2 = rms_norm(x, weight, eps, one_plus), rms_norm(x2, new_weight, new_eps, one_plus)
    torch.testing.assert_close(out2[:, :n], out, rtol=0, atol=1e-12)
    assert out2[:, n:].abs().max() <= 1e-12  # readers see 0 on the new dims (exactly 0 for RMSNorm)
    gains = (1 + new_weight) if kind == "rms_one_plus" else new_weight
    assert gains[n:].abs().min() > 0  # new gains non-zero: the new dims can learn


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_grow_hidden_layer_keeps_the_residual_invariant(kind):
    """A pre-norm block x + o(attn(norm(x))) + down(mlp(norm(·))) on the grown residual: old dims unchanged, new dims
    stay 0 (RMSNorm) or stay the mean of the old dims (LayerNorm)."""
    heads, kv_heads, d, n, n2, eps = 2, 1, 4, 6, 9, 1e-3
    layer = attention_layer(heads, kv_heads, d, n)
    layer.update({"gate.weight": randn(5, n, seed=30), "up.weight": randn(5, n, seed=31),
                  "down.weight": randn(n, 5, seed=32), "o.bias": randn(n, seed=33), "down.bias": randn(n, seed=34),
                  "attn_norm.weight": randn(n, seed=35), "mlp_norm.weight": randn(n, seed=36)})
    if kind == "layer":
        layer.update({"attn_norm.bias": randn(n, seed=37), "mlp_norm.bias": randn(n, seed=38)})
    grown = ops.grow_hidden_layer(layer, n2, kind, gen())

    def block(p, x, size, eps):
        def norm(name, h):
            if kind == "layer":
                return F.layer_norm(h, (size,), p[f"{name}.weight"], p[f"{name}.bias"], eps)
            return rms_norm(h, p[f"{name}.weight"], eps)

        h = x + attention(p, norm("attn_norm", x), heads, kv_heads, d, 10_000.0, d)
        return h + swiglu(p, norm("mlp_norm", h)) + p["down.bias"]

    x = randn(5, n, seed=40) + 0.5
    fill = x.mean(-1, keepdim=True) if kind == "layer" else torch.zeros(5, 1, dtype=D)
    x2 = torch.cat([x, fill.expand(-1, n2 - n)], -1)
    out, out2 = block(layer, x, n, eps), block(grown, x2, n2, eps * n / n2)
    torch.testing.assert_close(out2[:, :n], out, rtol=0, atol=1e-10)
    expected_new = out.mean(-1, keepdim=True) if kind == "layer" else torch.zeros(5, 1, dtype=D)
    torch.testing.assert_close(out2[:, n:], expected_new.expand(-1, n2 - n), rtol=0, atol=1e-10)


def test_grow_embedding_fill():
    e = randn(5, 3)
    assert torch.equal(ops.grow_embedding(e, 5, "rms")[:, 3:], torch.zeros(5, 2, dtype=D))
    torch.testing.assert_close(ops.grow_embedding(e, 5, "layer")[:, 3:], e.mean(1, keepdim=True).expand(-1, 2))
    torch.testing.assert_close(ops.grow_embedding(e, 5, "rms", scale=0.5)[:, :3], e * 0.5)


@pytest.mark.parametrize("copies", [2, 3])
def test_hidden_growth_by_copies_keeps_every_norm_and_breaks_symmetry(copies):
    """Residual [x, …, x]: readers give W·x, writers write k copies, norms (gain repeated, eps unchanged) see the
    same statistics; the reader copies differ (zero-sum noise), so training can pull the copies apart."""
    n, out = 5, 7
    layer = {"q.weight": randn(out, n, seed=1), "up.weight": randn(out, n, seed=2), "o.weight": randn(n, out, seed=3),
             "o.bias": randn(n, seed=4), "attn_norm.weight": randn(n, seed=5), "q_norm.weight": randn(3, seed=6)}
    grown = ops.copy_hidden_layer(layer, copies, gen())
    x, h = randn(4, n, seed=7), randn(4, out, seed=8)
    xk = x.repeat(1, copies)
    for reader in ("q", "up"):
        torch.testing.assert_close(xk @ grown[f"{reader}.weight"].T, x @ layer[f"{reader}.weight"].T, rtol=0, atol=1e-12)
        blocks = grown[f"{reader}.weight"].split(n, dim=1)
        assert (blocks[0] - blocks[1]).abs().max() > 1e-3
    torch.testing.assert_close(h @ grown["o.weight"].T + grown["o.bias"], (h @ layer["o.weight"].T + layer["o.bias"]).repeat(1, copies))
    eps = 1e-2
    torch.testing.assert_close(rms_norm(xk, grown["attn_norm.weight"], eps, False),
                               rms_norm(x, layer["attn_norm.weight"], eps, False).repeat(1, copies))
    assert torch.equal(grown["q_norm.weight"], layer["q_norm.weight"])  # per-head q/k norms: untouched
    weight, _ = ops.copy_norm(layer["attn_norm.weight"], None, copies, "rms_one_plus", factor=0.5)
    torch.testing.assert_close(1 + weight, ((1 + layer["attn_norm.weight"]) * 0.5).repeat(copies))


def test_per_head_values_follow_their_heads():
    """GPT-OSS sinks (one value per query head): 4 heads in 2 KV groups → 8 heads in 2 groups puts old head h at
    (h // 2)·4 + h % 2 (head_placement), new heads at 0; hand-computed."""
    placed = ops.place_head_values(torch.tensor([1.0, 2.0, 3.0, 4.0]), 4, 2, 8, 2)
    assert placed.tolist() == [1.0, 2.0, 0.0, 0.0, 3.0, 4.0, 0.0, 0.0]
    assert ops.place_head_values(torch.tensor([1.0, 2.0]), 2, 2, 2, 2).tolist() == [1.0, 2.0]
