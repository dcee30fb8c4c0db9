"""Function-preserving growth of one decoder layer, as pure functions on tensors (no files, no nn.Module).

A layer is a dict of *canonical* tensors, whatever the family calls them:
    q.weight (H·d, n)  k.weight / v.weight (K·d, n)  o.weight (n, H·d)   (+ .bias where the family has them)
    gate.weight / up.weight (I, n)  down.weight (n, I)                    (gate is absent for plain MLPs)
    attn_norm.weight / mlp_norm.weight (n,)                               (+ .bias for LayerNorm)
Fused layouts (Phi-3 qkv_proj and gate_up_proj, GPT-NeoX query_key_value) are split into this form first and
fused back afterwards, so every recipe below is written once.

The rule behind every recipe: each new multiplicative path gets exactly one zero factor — the side that *writes*
into the residual stream or the attention score — and random values everywhere else, so the function is unchanged
and every new parameter still receives a gradient (a zero gate *and* up row would be a dead neuron forever).
Function-preserving growth: Net2Net (Chen et al. 2015, arXiv:1511.05641) and bert2BERT (Chen et al. 2021,
arXiv:2110.07143) for width, Llama Pro (Wu et al. 2024, arXiv:2401.02415: copied blocks with zeroed output
projections) for depth, HyperCloning (Samragh et al. 2024, arXiv:2409.12903) for hidden size by copies; the
reader/writer vocabulary is netmorph/ops/roles.py's. Tensors are computed in float64 (so a float32 checkpoint gets
correctly rounded values); the caller casts back to the checkpoint dtype.
"""

import math

import torch

from netmorph.ops.roles import READERS, RESIDUAL_NORMS, WRITERS
from netmorph.errors import NetmorphError

# READERS (q k v gate up) read the (normalised) residual stream: their new input columns are free. WRITERS (o down)
# write into it: their new output rows must keep the invariant. Both follow from ops/roles.py ROLE_SPACES.
DTYPE = torch.float64


def _zeros(*shape) -> torch.Tensor:
    return torch.zeros(*shape, dtype=DTYPE)


def tensor_std(tensor: torch.Tensor, fallback: float = 0.02) -> float:
    """Scale of the random init for a tensor's new entries: the (unbiased) standard deviation of its existing values,
    computed in float64, in the tensor's own units; `fallback` when it has fewer than 2 elements or its std is 0 or
    not finite."""
    if tensor.numel() < 2:
        return fallback
    std = tensor.to(DTYPE).std().item()
    return std if math.isfinite(std) and std > 0 else fallback


def _normal(shape, std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=DTYPE) * std


def _std(layer_tensor: torch.Tensor, init_std: float | None) -> float:
    return init_std if init_std is not None else tensor_std(layer_tensor)


# ── depth ───────────────────────────────────────────────────────────────────────────────────────────────────────


POST_NORMS = {"attn_post_norm": "o", "mlp_post_norm": "down"}  # post-norm → the writer it scales (Gemma2/3, OLMo2)


def new_layer(source_layer: dict, init: str, generator: torch.Generator, init_std: float | None = None,
              zero_gain: float = 0.0) -> dict:
    """A new layer that adds nothing to the residual stream: its writers (o, down; weights and biases) are zero.

    init "copy" keeps the source layer's readers (Llama Pro); "normal" draws them afresh at each tensor's own scale.
    Pre-norm gains are kept (never zero: a zero gain would cut the gradient to everything behind it). A sub-layer
    with a post-norm gets that norm's gain zeroed instead (`zero_gain`: the stored value meaning gain 0, −1 for
    Gemma's 1 + w) and keeps its writer: zeroing the writer would leave the post-norm at RMSNorm(0), whose
    Jacobian is gain/√eps (~1000×) — exact but explosive.

    Tensors keep their dtype, except redrawn readers (float64); std: `init_std`, else each tensor's `tensor_std`.
    Llama Pro (Wu et al. 2024, arXiv:2401.02415) copies a block and zeroes its output projections.
    """
    silenced = {POST_NORMS[role] for role in POST_NORMS if f"{role}.weight" in source_layer}
    layer = {}
    for name, tensor in source_layer.items():
        role = name.split(".")[0]
        if role in POST_NORMS:
            layer[name] = torch.full_like(tensor, zero_gain)
        elif role in WRITERS and role not in silenced:
            layer[name] = torch.zeros_like(tensor)
        elif init == "normal" and role in READERS and name.endswith(".weight"):
            layer[name] = _normal(tensor.shape, _std(tensor, init_std), generator)
        else:
            layer[name] = tensor.clone()
    return layer


# ── MLP width ───────────────────────────────────────────────────────────────────────────────────────────────────


def grow_mlp(layer: dict, new_size: int, generator: torch.Generator, init_std: float | None = None) -> dict:
    """Intermediate size I → I′ (`new_size`): gate/up weights `[I, n]` → `[I′, n]` with random new rows N(0, std²)
    (std: `init_std`, else each tensor's `tensor_std`) and their biases `[I]` → `[I′]` with zeros; down `[n, I]` →
    `[n, I′]` with zero new columns (the neuron is alive but silent). Grown tensors are float64. Function-preserving
    width growth as in Net2Net (arXiv:1511.05641), with a zero output side instead of split copies."""
    layer = dict(layer)
    old = layer["up.weight"].shape[0]
    extra = new_size - old
    if extra == 0:
        return layer
    for role in ("gate", "up"):
        if f"{role}.weight" in layer:
            w = layer[f"{role}.weight"]
            layer[f"{role}.weight"] = torch.cat([w, _normal((extra, w.shape[1]), _std(w, init_std), generator)])
        if f"{role}.bias" in layer:
            layer[f"{role}.bias"] = torch.cat([layer[f"{role}.bias"], _zeros(extra)])
    down = layer["down.weight"]
    layer["down.weight"] = torch.cat([down, _zeros(down.shape[0], extra)], dim=1)
    return layer


# ── query heads and KV heads ────────────────────────────────────────────────────────────────────────────────────


def head_placement(heads: int, kv_heads: int, new_heads: int, new_kv_heads: int) -> tuple[list[int], list[int | None]]:
    """Where each old query head goes, and what each new KV head starts as, so every old query head still reads
    (a copy of) its own KV head. Query head h uses KV head h // G (G = heads per group).

    Old KV head j is replicated r times (positions j·r … j·r+r−1, r the smallest factor that leaves room for the
    old group: r·G′ ≥ G) and old query head (j, g) moves to j·r·G′ + g; leftover KV heads are new. r = 1 appends
    whole new groups or widens groups (new query heads at the end of each group, o_proj columns permuted);
    heads fixed with K → r·K duplicates KV heads and moves nothing.
    Returns (new index of each old query head, source KV head or None for each new KV head). Raises NetmorphError
    when no r ≤ K′/K gives r·G′ ≥ G (e.g. K′ < K, or groups too small to hold an old group). The grouping h // G is
    transformers' `repeat_kv` (https://github.com/huggingface/transformers,
    src/transformers/models/llama/modeling_llama.py).
    """
    group, new_group = heads // kv_heads, new_heads // new_kv_heads
    for r in range(1, new_kv_heads // kv_heads + 1):
        if r * new_group >= group:
            break
    else:
        raise NetmorphError(
            f"cannot place {heads} query heads in groups of {group} into {new_kv_heads} KV heads with groups of "
            f"{new_group}: keep at least {group} query heads per KV head, or use a multiple of {kv_heads} KV heads"
        )
    query_positions = [(h // group) * r * new_group + h % group for h in range(heads)]
    kv_sources = [j // r if j < r * kv_heads else None for j in range(new_kv_heads)]
    return query_positions, kv_sources


def place_head_values(values: torch.Tensor, heads: int, kv_heads: int, new_heads: int, new_kv_heads: int,
                      fill: float = 0.0) -> torch.Tensor:
    """A per-query-head vector (H,) — GPT-OSS's sink logits — for H′ heads: each old head's value moves with the
    head (`head_placement`), new heads get `fill`. A new head writes through zero o_proj columns, and each head's
    softmax (sink column included) is its own, so the new heads' values change no existing output."""
    positions, _ = head_placement(heads, kv_heads, new_heads, new_kv_heads)
    placed = torch.full((new_heads,), fill, dtype=values.dtype, device=values.device)
    placed[positions] = values
    return placed


def regroup_heads(
    layer: dict, heads: int, kv_heads: int, head_dim: int, new_heads: int, new_kv_heads: int,
    generator: torch.Generator, init_std: float | None = None, full_width_k_norm: bool = False,
) -> dict:
    """Heads H → H′ and KV heads K → K′ at a fixed head_dim d (see `head_placement`).

    New query heads: random q rows, zero o_proj columns. New KV heads: copies (exact: the copies serve different
    query heads and drift apart in training) or random rows where no old head needs them. A k norm over all KV heads
    together (OLMo2, `full_width_k_norm`) follows its heads; with every new KV head a copy, each old head appears
    equally often, so its mean square — and the norm — is unchanged. Per-head q/k norms (one weight over head_dim)
    need nothing.

    Shapes: q `[H·d, n]` → `[H′·d, n]`, k/v `[K·d, n]` → `[K′·d, n]` (biases likewise, new entries 0), o `[n, H·d]` →
    `[n, H′·d]`; new tensors float64. Raises NetmorphError when `head_placement` finds no placement, or when a
    full-width k norm meets new KV heads that are not all copies."""
    if (heads, kv_heads) == (new_heads, new_kv_heads):
        return dict(layer)
    layer = dict(layer)
    positions, kv_sources = head_placement(heads, kv_heads, new_heads, new_kv_heads)
    d = head_dim

    q = layer["q.weight"].reshape(heads, d, -1)
    new_q = _normal((new_heads, d, q.shape[-1]), _std(q, init_std), generator)
    new_q[positions] = q
    layer["q.weight"] = new_q.reshape(new_heads * d, -1)
    if "q.bias" in layer:
        bias = _zeros(new_heads, d)
        bias[positions] = layer["q.bias"].reshape(heads, d)
        layer["q.bias"] = bias.reshape(-1)

    for role in ("k", "v"):
        w = layer[f"{role}.weight"].reshape(kv_heads, d, -1)
        random_heads = _normal((new_kv_heads, d, w.shape[-1]), _std(w, init_std), generator)
        rows = [w[j] if j is not None else random_heads[i] for i, j in enumerate(kv_sources)]
        layer[f"{role}.weight"] = torch.stack(rows).reshape(new_kv_heads * d, -1)
        if f"{role}.bias" in layer:
            b = layer[f"{role}.bias"].reshape(kv_heads, d)
            layer[f"{role}.bias"] = torch.stack([b[j] if j is not None else _zeros(d) for j in kv_sources]).reshape(-1)

    if full_width_k_norm and "k_norm.weight" in layer:
        if None in kv_sources:
            raise NetmorphError(f"{new_kv_heads} KV heads are not all copies of the {kv_heads} old ones: a full-width "
                                f"k norm needs a multiple of {kv_heads}")
        norm = layer["k_norm.weight"].reshape(kv_heads, d)
        layer["k_norm.weight"] = torch.stack([norm[j] for j in kv_sources]).reshape(-1)

    o = layer["o.weight"].reshape(-1, heads, d)
    new_o = _zeros(o.shape[0], new_heads, d)
    new_o[:, positions] = o
    layer["o.weight"] = new_o.reshape(o.shape[0], new_heads * d)
    return layer


# ── head_dim ────────────────────────────────────────────────────────────────────────────────────────────────────


def qk_dim_positions(head_dim: int, new_head_dim: int, rotary_dims: int) -> list[int]:
    """New index, inside a q/k head, of each old dimension, keeping RoPE's rotate-half pairs (i, i + r/2) paired.

    Partial rotary (r < d): rotary dims first, pass-through after — pad at the end, nothing moves.
    Full rotary, d′ = k·d: old pair i → new pair k·i (frequency θ^(−2i/d) is new frequency k·i: θ unchanged).
    Full rotary otherwise: per-half padding [x1, pad, x2, pad]; the caller sets θ′ = θ^(d′/d).
    Returns `head_dim` indices in [0, new_head_dim). Pairing: transformers' `rotate_half`
    (src/transformers/models/llama/modeling_llama.py); frequencies θ^(−2i/d): RoFormer (Su et al. 2021,
    arXiv:2104.09864).
    """
    if rotary_dims < head_dim:
        return list(range(head_dim))
    half, new_half = head_dim // 2, new_head_dim // 2
    stride = new_head_dim // head_dim if new_head_dim % head_dim == 0 else 1
    return [stride * i if i < half else new_half + stride * (i - half) for i in range(head_dim)]


def grow_head_dim(
    layer: dict, heads: int, kv_heads: int, head_dim: int, new_head_dim: int, rotary_dims: int,
    generator: torch.Generator, init_std: float | None = None, scores_scale_with_head_dim: bool = True,
) -> dict:
    """head_dim d → d′. q/k dims move per `qk_dim_positions`; q pads random, k pads zero (scores unchanged); q ×
    √(d′/d) undoes the change of the 1/√head_dim scaling (not needed where the scale is a config constant: Gemma2/3's
    query_pre_attn_scalar, `scores_scale_with_head_dim` False); v pads random at the end of each head with zero
    o_proj columns. Shapes: q `[H·d, n]` → `[H·d′, n]`, k/v `[K·d, n]` → `[K·d′, n]` (biases likewise, new entries
    0), o `[n, H·d]` → `[n, H·d′]`; float64."""
    if new_head_dim == head_dim:
        return dict(layer)
    layer = dict(layer)
    d, d2 = head_dim, new_head_dim
    positions = qk_dim_positions(d, d2, rotary_dims)
    q_scale = math.sqrt(d2 / d) if scores_scale_with_head_dim else 1.0

    def place(tensor, count, fill):  # (count·d, ...) → (count·d2, ...), old dims at `positions`
        """(count·d, ...) → (count·d2, ...): per head, the old dims at `positions`, every other dim from
        `fill(shape)` (float64)."""
        per_head = tensor.reshape(count, d, *tensor.shape[1:])
        grown = fill((count, d2, *tensor.shape[1:]))
        grown[:, positions] = per_head
        return grown.reshape(count * d2, *tensor.shape[1:])

    q = layer["q.weight"]
    layer["q.weight"] = place(q, heads, lambda shape: _normal(shape, _std(q, init_std), generator)) * q_scale
    if "q.bias" in layer:
        layer["q.bias"] = place(layer["q.bias"], heads, _zeros) * q_scale
    layer["k.weight"] = place(layer["k.weight"], kv_heads, _zeros)
    if "k.bias" in layer:
        layer["k.bias"] = place(layer["k.bias"], kv_heads, _zeros)

    v_positions = list(range(d))  # v is not rotated: pad at the end of each head
    v = layer["v.weight"].reshape(kv_heads, d, -1)
    new_v = _normal((kv_heads, d2, v.shape[-1]), _std(v, init_std), generator)
    new_v[:, v_positions] = v
    layer["v.weight"] = new_v.reshape(kv_heads * d2, -1)
    if "v.bias" in layer:
        layer["v.bias"] = torch.cat([layer["v.bias"].reshape(kv_heads, d), _zeros(kv_heads, d2 - d)], 1).reshape(-1)
    o = layer["o.weight"].reshape(-1, heads, d)
    layer["o.weight"] = torch.cat([o, _zeros(o.shape[0], heads, d2 - d)], dim=2).reshape(o.shape[0], heads * d2)
    return layer


def scale_queries(layer: dict, factor: float) -> dict:
    """q.weight and q.bias (when present) × factor, in float64: every attention score of the layer × factor. factor
    1.0 returns `layer` itself."""
    if factor == 1.0:
        return layer
    layer = dict(layer)
    for name in ("q.weight", "q.bias"):
        if name in layer:
            layer[name] = layer[name].to(DTYPE) * factor
    return layer


# ── hidden size ─────────────────────────────────────────────────────────────────────────────────────────────────


def grow_norm(
    weight: torch.Tensor, bias: torch.Tensor | None, new_size: int, kind: str, extra_factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A norm over n → n′ dims (eps must be scaled by n/n′ in the config).

    The normalised old dims come out √(n′/n) larger (RMS over more dims, or LayerNorm variance of a mean-filled
    vector), so the old gains are × √(n/n′). New gains: the mean old gain — non-zero, so the new dims learn.
    kind: "rms" (gain w), "rms_one_plus" (Gemma: gain 1+w), "layer" (LayerNorm: gain w, bias; new bias 0 so the
    readers see exactly 0 on the new dims). `extra_factor` multiplies the old gains too (a tied head: 1/embedding
    scale). weight `[n]` → `[n′]`, bias `[n]` → `[n′]` (None stays None), float64. Derivation: the RMS of a zero-filled
    (or the variance of a mean-filled) vector over n′ dims is √(n/n′) times that over the n old dims.
    """
    scale = math.sqrt(weight.shape[0] / new_size) * extra_factor
    extra = new_size - weight.shape[0]
    gain = (1.0 + weight.to(DTYPE) if kind == "rms_one_plus" else weight.to(DTYPE)) * scale
    new_gain = gain.abs().mean().clamp_min(1e-3).expand(extra)
    grown = torch.cat([gain, new_gain])
    if kind == "rms_one_plus":
        grown = grown - 1.0
    new_bias = None if bias is None else torch.cat([bias.to(DTYPE), _zeros(extra)])
    return grown, new_bias


def _new_rows(matrix: torch.Tensor, extra: int, fill: str) -> torch.Tensor:
    """Rows for the new residual dims of a writer: zero-fill (RMSNorm) or mean-fill (LayerNorm), float64."""
    if fill == "mean":
        return matrix.to(DTYPE).mean(dim=0, keepdim=True).expand(extra, *matrix.shape[1:])
    return _zeros(extra, *matrix.shape[1:])


def grow_hidden_layer(
    layer: dict, new_size: int, norm_kind: str, generator: torch.Generator, init_std: float | None = None
) -> dict:
    """Hidden size n → n′ inside a layer. Readers (q, k, v, gate, up) get random new columns, weights `[out, n]` →
    `[out, n′]` (they only ever see 0 there); writers (o, down) get new rows, weights `[n, in]` → `[n′, in]` and
    biases `[n]` → `[n′]`, that keep the residual stream's new dims at 0 (RMSNorm) or at the mean of the old dims
    (LayerNorm); residual norms `[n]` → `[n′]` per `grow_norm`. norm_kind: "rms", "rms_one_plus" or "layer". Grown
    tensors are float64; the caller scales the norms' eps by n/n′. Function-preserving width growth: Net2Net
    (arXiv:1511.05641), bert2BERT (arXiv:2110.07143)."""
    layer = dict(layer)
    fill = "mean" if norm_kind == "layer" else "zero"
    for name, tensor in list(layer.items()):
        role, kind = name.split(".", 1)
        extra = new_size - (tensor.shape[-1] if role in READERS and kind == "weight" else tensor.shape[0])
        if role in READERS and kind == "weight":
            layer[name] = torch.cat([tensor, _normal((tensor.shape[0], extra), _std(tensor, init_std), generator)], 1)
        elif role in WRITERS:
            layer[name] = torch.cat([tensor.to(DTYPE), _new_rows(tensor, extra, fill)])
    for norm in RESIDUAL_NORMS:
        if f"{norm}.weight" in layer:
            weight, bias = grow_norm(layer[f"{norm}.weight"], layer.get(f"{norm}.bias"), new_size, norm_kind)
            layer[f"{norm}.weight"] = weight
            if bias is not None:
                layer[f"{norm}.bias"] = bias
    return layer


def grow_embedding(embedding: torch.Tensor, new_size: int, norm_kind: str, scale: float = 1.0) -> torch.Tensor:
    """Token (or position) embedding `[V, n]` → `[V, n′]`, float64: new columns 0 (RMSNorm) or each row's mean
    (norm_kind "layer"). `scale` multiplies the whole table: it folds in a change of the model's own embedding
    multiplier (Gemma: √n → √n′)."""
    extra = new_size - embedding.shape[1]
    e = embedding.to(DTYPE) * scale
    new = e.mean(dim=1, keepdim=True).expand(-1, extra) if norm_kind == "layer" else _zeros(e.shape[0], extra)
    return torch.cat([e, new], dim=1)


def grow_lm_head(lm_head: torch.Tensor, new_size: int, generator: torch.Generator, init_std: float | None = None):
    """An untied output head `[V, n]` → `[V, n′]`, float64: it reads the final norm, which is exactly 0 on the new
    dims, so the new columns are random N(0, std²) (std: `init_std`, else the head's `tensor_std`)."""
    extra = new_size - lm_head.shape[1]
    return torch.cat([lm_head.to(DTYPE), _normal((lm_head.shape[0], extra), _std(lm_head, init_std), generator)], 1)


# ── hidden size by whole copies (the residual stream becomes [x, x, …, x]) ───────────────────────────────────────
# Every norm sees the same mean and mean square over k·n dims as over n, so no gain or eps changes: the recipe for
# families whose one eps field also serves q/k norms (Qwen3, Gemma3), where zero-fill's eps × n/n′ would not be
# exact. HyperCloning's layout; zero-sum noise on the reader copies breaks the copies' symmetry — small
# (COPY_NOISE × the tensor's spread, ~20 dB below the weights): any non-zero amount does that, and a large one only
# adds float cancellation noise to the exact sum.
COPY_NOISE = 0.1


def _reader_copies(weight: torch.Tensor, copies: int, generator: torch.Generator, noise_std: float) -> torch.Tensor:
    """(out, n) → (out, k·n): k blocks W/k + N_i with Σ N_i = 0, so W′·[x, …, x] = W·x for any noise."""
    noise = _normal((copies, *weight.shape), noise_std, generator)
    blocks = weight.to(DTYPE) / copies + (noise - noise.mean(dim=0, keepdim=True))
    return torch.cat(list(blocks), dim=1)


def copy_hidden_layer(layer: dict, copies: int, generator: torch.Generator, init_std: float | None = None) -> dict:
    """Hidden n → k·n (k = `copies`) inside a layer: reader weights `[out, n]` → `[out, k·n]` as `_reader_copies`
    (blocks W/k plus zero-sum noise of std COPY_NOISE × the tensor's std); writer weights `[n, in]` → `[k·n, in]`,
    writer biases and every residual-norm weight/bias repeated k times; float64. The residual stream becomes [x, …,
    x] (HyperCloning, Samragh et al. 2024, arXiv:2409.12903)."""
    layer = dict(layer)
    for name, tensor in list(layer.items()):
        role, kind = name.split(".", 1)
        if role in READERS and kind == "weight":
            layer[name] = _reader_copies(tensor, copies, generator, COPY_NOISE * _std(tensor, init_std))
        elif role in WRITERS or role in RESIDUAL_NORMS:
            layer[name] = tensor.to(DTYPE).repeat(copies, *([1] * (tensor.dim() - 1)))
    return layer


def copy_embedding(embedding: torch.Tensor, copies: int, scale: float = 1.0) -> torch.Tensor:
    """`[V, n]` → `[V, k·n]`, float64: each row repeated k times, times `scale` (a change of the embedding
    multiplier, Gemma) (HyperCloning, Samragh et al. 2024, arXiv:2409.12903)."""
    return (embedding.to(DTYPE) * scale).repeat(1, copies)


def copy_norm(weight: torch.Tensor, bias: torch.Tensor | None, copies: int, kind: str, factor: float = 1.0):
    """A norm over n → k·n by copies: weight `[n]` → `[k·n]` (bias likewise; None stays None), float64. Gains
    repeated × `factor` (a tied head reads k copies: 1/k there); for kind "rms_one_plus" the gain 1 + w is scaled and
    stored back as w."""
    gain = (1.0 + weight.to(DTYPE) if kind == "rms_one_plus" else weight.to(DTYPE)) * factor
    grown = gain.repeat(copies) - (1.0 if kind == "rms_one_plus" else 0.0)
    return grown, None if bias is None else (bias.to(DTYPE) * factor).repeat(copies)


def copy_lm_head(lm_head: torch.Tensor, copies: int, generator: torch.Generator, init_std: float | None = None):
    """An untied output head `[V, n]` → `[V, k·n]`, float64: a reader of the final norm's k copies, grown as
    `_reader_copies` (HyperCloning, Samragh et al. 2024, arXiv:2409.12903)."""
    return _reader_copies(lm_head, copies, generator, COPY_NOISE * _std(lm_head, init_std))
