"""Export of one Llama-style attention layer to the stock transformers `DiffLlama` layout (approximate).

Notation: H query heads, G KV heads, d head_dim, D hidden size; weights are `nn.Linear` weights `[out, in]`.

Stock DiffLlama (transformers 5.x) with `num_attention_heads = 2H`, `num_key_value_heads = 2G`, `head_dim = d`:
differential head j < H has query head j (positive) and j + H (negative), key heads j // n and j // n + G (n = H/G),
and reads the 2d-wide value [v_{j//n} ‖ v_{j//n + G}]. Its output is
`(1 − λ_init) · RMSNorm_2d(o⁺ − λ·o⁻)` — a parameter-free RMSNorm that always runs — followed by o_proj whose
input column j·2d + c belongs to differential head j.

The construction (derived here from the stock class's forward,
https://github.com/huggingface/transformers/blob/main/src/transformers/models/diffllama/modeling_diffllama.py,
plus a value anchor):
- q/k: source rows first (positive), new negative rows after them; v: source rows, then G "anchor" heads whose
  weights are 0 and whose bias is `anchor` in every element. Attention rows sum to one, so every differential head's
  second half is the constant `anchor` vector (with λ = 0).
- λ = 0: λ_q1 = λ_k1 = 0 and λ_q2 = λ_k2 = √(ln(1 + λ_init)/d)·1, so exp(0) − exp(ln(1 + λ_init)) + λ_init = 0
  up to rounding (DiffLlama's λ_init is a fixed Python float, not a parameter).
- o_proj: column j·2d + c = W_o[:, j·d + c] · r₀/(1 − λ_init) for c < d, 0 for c ≥ d, where r₀ = √(anchor²/2 + ε)
  is the RMSNorm's denominator for a zero first half.

The RMSNorm then divides head j's output a by √((|a|² + d·anchor²)/(2d) + ε) instead of r₀: the relative error is
≈ mean(a²)/anchor², so a large anchor makes the export nearly exact, and anchor = 0 is the plain construction without an
anchor, where the norm rescales every head output to unit RMS (a large divergence).
"""

import math

import torch

from netmorph.ops.diff_attention import NegativeInit, doubled_projection, paper_lambda_init


def zero_lambda_vectors(layer_idx: int, head_dim: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """λ vectors that make DiffLlama's λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init zero for its fixed λ_init =
    `paper_lambda_init(layer_idx)` (DiffLlama's `lambda_init_fn`): λq1 = λk1 = 0 and λq2 = λk2 = √(ln(1 +
    λ_init)/d)·1, so λ = 1 − (1 + λ_init) + λ_init = 0 up to rounding in `dtype`. Four `[head_dim]` tensors in
    `dtype` on the CPU. Stock class:
    https://github.com/huggingface/transformers/blob/main/src/transformers/models/diffllama/modeling_diffllama.py."""
    zeros = torch.zeros(head_dim, dtype=torch.float32)
    second = torch.full((head_dim,), math.sqrt(math.log1p(paper_lambda_init(layer_idx)) / head_dim))
    vectors = {"lambda_q1": zeros, "lambda_k1": zeros, "lambda_q2": second, "lambda_k2": second}
    return {name: vector.to(dtype).clone() for name, vector in vectors.items()}


def diffllama_lambda(vectors: dict[str, torch.Tensor], layer_idx: int) -> torch.Tensor:
    """λ exactly as stock DiffLlama computes it: exp(Σ λq1·λk1) − exp(Σ λq2·λk2) + λ_init, the sums in float32 over
    the last dim (a 0-d float32 tensor for `[d]` vectors), λ_init the fixed Python float of layer `layer_idx`.
    KeyError when a vector is missing."""
    lambda_1 = torch.exp(torch.sum(vectors["lambda_q1"] * vectors["lambda_k1"], dim=-1, dtype=torch.float32))
    lambda_2 = torch.exp(torch.sum(vectors["lambda_q2"] * vectors["lambda_k2"], dim=-1, dtype=torch.float32))
    return lambda_1 - lambda_2 + paper_lambda_init(layer_idx)


def anchored_value(weight: torch.Tensor, bias: torch.Tensor | None, anchor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """v_proj weight `[G·d, D]` → `[2·G·d, D]`: the source rows, then zero rows; bias → `[2·G·d]`: the source bias
    (zeros when None), then `anchor` in every element. The weight's dtype and device (an anchor that dtype cannot
    represent is rounded)."""
    new_weight = torch.cat([weight, torch.zeros_like(weight)], dim=0)
    source_bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if bias is None else bias
    return new_weight, torch.cat([source_bias, torch.full_like(source_bias, anchor)], dim=0)


def interleaved_o_proj(o_weight: torch.Tensor, num_heads: int, head_dim: int, scale: float) -> torch.Tensor:
    """o_proj weight `[D, H·d]` → `[D, 2·H·d]`: head j's columns at j·2d … j·2d + d − 1, times `scale` (multiplied in
    float64, rounded once to o_weight's dtype), and zeros at j·2d + d … j·2d + 2d − 1."""
    out_features = o_weight.shape[0]
    heads = o_weight.reshape(out_features, num_heads, head_dim)
    scaled = (heads.to(torch.float64) * scale).to(o_weight.dtype)
    return torch.cat([scaled, torch.zeros_like(heads)], dim=-1).reshape(out_features, 2 * num_heads * head_dim)


def o_proj_scale(layer_idx: int, anchor: float, eps: float) -> float:
    """r₀/(1 − λ_init) with r₀ = √(anchor²/2 + eps): undoes DiffLlama's (1 − λ_init) output factor and its RMSNorm's
    denominator at a zero first half. anchor 0: 1/(1 − λ_init) (no denominator is undone; the norm then rescales each
    head, see the module docstring). eps: DiffLlama's rms_norm_eps."""
    denominator = math.sqrt(anchor**2 / 2 + eps) if anchor else 1.0
    return denominator / (1 - paper_lambda_init(layer_idx))


def diffllama_attention_tensors(
    attn: dict[str, torch.Tensor],
    layer_idx: int,
    num_heads: int,
    head_dim: int,
    anchor: float,
    eps: float,
    negative_init: NegativeInit,
    negative_std: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """One layer: Llama attention tensors {"q_proj.weight" `[H·d, D]`, "q_proj.bias"?, "k_proj.*" `[G·d, D]`,
    "v_proj.*", "o_proj.*" `[D, H·d]`} → stock DiffLlama attention tensors with all four biases (the anchor needs a v
    bias and DiffLlama's `attention_bias` is one flag; absent biases become zeros): q `[2·H·d, D]` and k `[2·G·d, D]`
    (`doubled_projection`), v `[2·G·d, D]` (`anchored_value`), o `[D, 2·H·d]` (`interleaved_o_proj` × `o_proj_scale`)
    with bias `[D]`, and the λ vectors `[d]` (`zero_lambda_vectors`); in q_proj.weight's dtype. Raises KeyError when
    a weight is missing. Stock class:
    https://github.com/huggingface/transformers/blob/main/src/transformers/models/diffllama/modeling_diffllama.py."""
    dtype = attn["q_proj.weight"].dtype
    out = {}
    for proj in ("q_proj", "k_proj"):
        weight = attn[f"{proj}.weight"]
        bias = attn.get(f"{proj}.bias")
        if bias is None:
            bias = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device)
        out[f"{proj}.weight"], out[f"{proj}.bias"] = doubled_projection(
            weight, bias, negative_init, negative_std, generator
        )
    out["v_proj.weight"], out["v_proj.bias"] = anchored_value(attn["v_proj.weight"], attn.get("v_proj.bias"), anchor)
    out["o_proj.weight"] = interleaved_o_proj(
        attn["o_proj.weight"], num_heads, head_dim, o_proj_scale(layer_idx, anchor, eps)
    )
    o_bias = attn.get("o_proj.bias")
    out["o_proj.bias"] = (
        torch.zeros(attn["o_proj.weight"].shape[0], dtype=dtype, device=attn["o_proj.weight"].device)
        if o_bias is None
        else o_bias
    )
    out.update(zero_lambda_vectors(layer_idx, head_dim, dtype))
    return out
