"""Conversion of one attention layer's tensors to DIFF V2 (Microsoft, Jan 2026;
https://github.com/microsoft/unilm/tree/master/Diff-Transformer).

DIFF V2: q_proj has 2H query heads, K and V keep their G heads, one standard attention call covers all 2H query
heads, then differential head j = out[2j] − sigmoid(lambda_proj(x))_j · out[2j + 1], and o_proj maps the H heads
back. No λ_init, no exp re-parameterisation, no sub-layer norm.

Exact construction: query heads 2j and 2j + 1 are both copies of source head j (so they sit in the same GQA group:
(2j) // (2n) = (2j + 1) // (2n) = j // n with n = H/G), lambda_proj = 0 so λ = sigmoid(0) = 0.5 exactly, and
o_proj = 2·W_o. Then 2·(a − 0.5·a) = a with every step exact in binary floating point (scaling by 0.5 and 2 is
exact, a − 0.5·a = 0.5·a exactly), so the converted layer reproduces the source up to the matmul order (a BLAS
kernel may round the wider q projection differently by an ulp).
The gradients of the paired heads differ (∂/∂a₁ = 2g, ∂/∂a₂ = −g), so training pulls them apart.
"""

import torch


def paired_query(weight: torch.Tensor, bias: torch.Tensor | None, head_dim: int):
    """q_proj weight `[H·d, D]` → `[2·H·d, D]` with the rows of source head j at heads 2j and 2j + 1; bias `[H·d]` →
    `[2·H·d]` likewise (None stays None). New tensors in the inputs' dtype and device; RuntimeError when `head_dim`
    does not divide the rows. DIFF V2's head pairing
    (https://github.com/microsoft/unilm/tree/master/Diff-Transformer); the copies are this module's construction."""
    in_features = weight.shape[-1]
    heads = weight.reshape(-1, 1, head_dim, in_features)
    new_weight = heads.expand(-1, 2, -1, -1).reshape(-1, in_features).clone()
    if bias is None:
        return new_weight, None
    return new_weight, bias.reshape(-1, 1, head_dim).expand(-1, 2, -1).reshape(-1).clone()


def convert_attention_tensors_v2(attn: dict[str, torch.Tensor], num_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """One layer: {"q_proj.weight" `[H·d, D]`, "q_proj.bias"? `[H·d]`, "k_proj.*", "v_proj.*", "o_proj.weight" `[D,
    H·d]`, "o_proj.bias"?} → the DIFF V2 tensors under the same names: q_proj paired (`paired_query`, `[2·H·d, D]`),
    o_proj.weight × 2 (exact: a power of two), k/v and o_proj.bias unchanged, plus "lambda_proj.weight", zeros `[H,
    D]` in q_proj's dtype and device (λ = sigmoid(0) = 0.5 for every token and head). Raises KeyError when
    q_proj.weight or o_proj.weight is missing. DIFF V2:
    https://github.com/microsoft/unilm/tree/master/Diff-Transformer."""
    out = dict(attn)
    out["q_proj.weight"], q_bias = paired_query(attn["q_proj.weight"], attn.get("q_proj.bias"), head_dim)
    if q_bias is not None:
        out["q_proj.bias"] = q_bias
    out["o_proj.weight"] = attn["o_proj.weight"] * 2  # exact: a power of two
    hidden = attn["q_proj.weight"].shape[-1]
    out["lambda_proj.weight"] = torch.zeros(
        num_heads, hidden, dtype=attn["q_proj.weight"].dtype, device=attn["q_proj.weight"].device
    )
    return out

