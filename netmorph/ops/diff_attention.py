"""Conversion of one attention layer's tensors to differential attention (Ye et al. 2024, arXiv:2410.05258).

Notation: H query heads, G KV heads, d head_dim, D hidden size; weights are `nn.Linear` weights `[out, in]`.

"doubled" layout: q_proj `[H·d, D] → [2·H·d, D]` and k_proj `[G·d, D] → [2·G·d, D]`; the source rows (and biases)
come first and are the positive component, new rows after them are the negative component. V and O are unchanged.
With mix = 0 (or with λ exactly 0) the converted layer computes the source layer exactly.

"split" layout (approximate): q/k keep their shapes; heads [H/2, H) and KV heads [G/2, G) become the negative
component. o_proj columns are regrouped so that differential head j's 2d-wide output feeds the columns the source
model used for heads j and j + H/2.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch

from netmorph.ops.diff_v2 import convert_attention_tensors_v2

NegativeInit = Literal["normal", "zero", "mirror"]
LambdaStart = Literal["paper", "zero"]


@dataclass(frozen=True)
class DiffAttentionRecipe:
    """How `convert_attention_tensors` converts one layer.

    layout: "doubled" (new negative q/k rows; exact while mix = 0), "split" (half the heads become the negative
    component; approximate) or "v2" (DIFF V2, exact). negative_init / negative_std: the new negative q/k rows of the
    doubled layout (`negative_component`; std of N(0, std²), in the weights' own units). lambda_start / lambda_std:
    the λ vectors and λ_init (`lambda_tensors`). sublayer_norm: add the paper's per-head RMSNorm weight
    `subln.weight` (approximate). Formulas: Ye et al. 2024, arXiv:2410.05258 §2.1; DIFF V2:
    https://github.com/microsoft/unilm/tree/master/Diff-Transformer."""

    layout: Literal["doubled", "split", "v2"] = "doubled"
    negative_init: NegativeInit = "normal"
    negative_std: float = 0.02
    lambda_start: LambdaStart = "paper"
    lambda_std: float = 0.1
    sublayer_norm: bool = False


def paper_lambda_init(layer_idx: int) -> float:
    """λ_init of layer `layer_idx` (0-based): 0.8 − 0.6·exp(−0.3·layer_idx) — the Differential Transformer paper's
    0.8 − 0.6·exp(−0.3·(l − 1)) for the 1-based layer l (Ye et al. 2024, arXiv:2410.05258, §2.1). The modeling file
    keeps its own copy: it must run without netmorph."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


def negative_component(
    positive: torch.Tensor, init: NegativeInit, std: float, generator: torch.Generator, is_bias: bool = False
) -> torch.Tensor:
    """New negative q or k rows (or bias) for the doubled layout, with `positive`'s shape, dtype and device.
    "mirror": a copy of `positive`; "zero", or any bias (`is_bias`): zeros; "normal": N(0, std²) drawn in float32
    from `generator`, then cast to `positive`'s dtype (on the meta device, while planning, nothing is allocated)."""
    if init == "mirror":
        return positive.clone()
    if init == "zero" or is_bias:
        # A fresh negative bias starts at zero: the weights alone carry the random init.
        return torch.zeros_like(positive)
    # On the meta device (planning a conversion's output) this allocates nothing; on CPU it draws the same numbers.
    noise = torch.randn(positive.shape, generator=generator, dtype=torch.float32, device=positive.device)
    return (noise * std).to(positive.dtype)


def doubled_projection(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    init: NegativeInit,
    std: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """weight `[n·d, D]` → `[2·n·d, D]`: the source rows first (positive component), `negative_component` rows after
    them (negative); bias `[n·d]` → `[2·n·d]` with zeros after it (None stays None). The inputs' dtype and device.
    The paper's two query/key groups [Q₁; Q₂] of the projection (Ye et al. 2024, arXiv:2410.05258, §2.1)."""
    new_weight = torch.cat([weight, negative_component(weight, init, std, generator)], dim=0)
    if bias is None:
        return new_weight, None
    return new_weight, torch.cat([bias, negative_component(bias, init, std, generator, is_bias=True)], dim=0)


def split_layout_o_proj(o_weight: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Regroup o_proj columns for the split layout: `[D, H·d]` → `[D, H·d]`, same dtype. Differential head j (value
    dim 2d) writes what source heads j and j + H/2 wrote: new column j·2d + c ← old j·d + c, and j·2d + d + c ← old
    (j + H/2)·d + c. H must be even (the caller checks: `check_convertible`; RuntimeError otherwise) and `o_weight`
    contiguous (`view`). The 2d-wide differential head: Ye et al. 2024, arXiv:2410.05258, §2.1."""
    out_features = o_weight.shape[0]
    heads = o_weight.view(out_features, num_heads, head_dim)  # (D, H, d)
    first, second = heads.chunk(2, dim=1)  # (D, H/2, d) each
    return torch.cat([first, second], dim=-1).reshape(out_features, num_heads * head_dim)


def lambda_tensors(
    layer_idx: int, head_dim: int, start: LambdaStart, std: float, generator: torch.Generator, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """λ tensors of one converted layer, in `dtype` on the CPU: "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"
    `[head_dim]` (drawn in float32 from `generator`), and 0-d "lambda_init" and "mix" (= 0: the layer computes its
    source until training raises the mix).

    "paper": four independent N(0, std²) vectors and the paper's λ_init; λ ≠ 0 once mix > 0. "zero": λ_init = 0 and
    all four vectors equal to one non-zero vector u, so λ = e^{u·u} − e^{u·u} = 0 exactly at any mix, while ∂λ/∂λq1 =
    e^{u·u}·u ≠ 0 keeps every vector trainable.

    λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init (Ye et al. 2024, arXiv:2410.05258, §2.1); the modeling code multiplies
    λ by `mix` (netmorph's warm-up factor)."""
    if start == "zero":
        u = torch.randn(head_dim, generator=generator) * std
        vectors = [u, u, u, u]
        lambda_init = 0.0
    else:
        vectors = [torch.randn(head_dim, generator=generator) * std for _ in range(4)]
        lambda_init = paper_lambda_init(layer_idx)
    names = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")
    tensors = {name: vector.to(dtype).clone() for name, vector in zip(names, vectors)}
    tensors["lambda_init"] = torch.tensor(lambda_init, dtype=dtype)
    tensors["mix"] = torch.tensor(0.0, dtype=dtype)
    return tensors


def convert_attention_tensors(
    attn: dict[str, torch.Tensor],
    layer_idx: int,
    num_heads: int,
    head_dim: int,
    recipe: DiffAttentionRecipe,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """One layer: {"q_proj.weight" `[H·d, D]`, "q_proj.bias"?, "k_proj.*" `[G·d, D]`, "v_proj.*", "o_proj.*" `[D,
    H·d]`} → the differential tensors under the same names, plus the λ tensors (`lambda_tensors`) and, with
    `recipe.sublayer_norm`, "subln.weight" (ones `[d]` doubled, `[2d]` split).

    doubled: q `[2·H·d, D]`, k `[2·G·d, D]` (`doubled_projection`, biases likewise), v and o unchanged. split: o_proj
    regrouped (`split_layout_o_proj`), q/k/v unchanged. v2: DIFF V2's exact construction (netmorph/ops/diff_v2.py),
    no λ tensors. New tensors in q_proj.weight's dtype. Raises KeyError when a weight it needs is missing. Formulas:
    Ye et al. 2024, arXiv:2410.05258, §2.1; DIFF V2: https://github.com/microsoft/unilm/tree/master/Diff-Transformer."""
    if recipe.layout == "v2":
        return convert_attention_tensors_v2(attn, num_heads, head_dim)
    out = dict(attn)
    if recipe.layout == "doubled":
        for proj in ("q_proj", "k_proj"):
            weight, bias = doubled_projection(
                attn[f"{proj}.weight"], attn.get(f"{proj}.bias"), recipe.negative_init, recipe.negative_std, generator
            )
            out[f"{proj}.weight"] = weight
            if bias is not None:
                out[f"{proj}.bias"] = bias
        value_dim = head_dim
    else:
        out["o_proj.weight"] = split_layout_o_proj(attn["o_proj.weight"], num_heads, head_dim)
        value_dim = 2 * head_dim
    dtype = attn["q_proj.weight"].dtype
    out.update(lambda_tensors(layer_idx, head_dim, recipe.lambda_start, recipe.lambda_std, generator, dtype))
    if recipe.sublayer_norm:
        out["subln.weight"] = torch.ones(value_dim, dtype=dtype)
    return out
