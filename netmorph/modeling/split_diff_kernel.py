"""A fused Triton kernel for split-heads differential attention: two score maps, one shared value.

In the split (paper) layout, differential head j has a positive and a negative query/key pair, each of head_dim d,
and ONE value of width 2d. Per head:

    o_pos = softmax(q_pos k_posᵀ·scale) · V        o_neg = softmax(q_neg k_negᵀ·scale) · V        (V: S × 2d)

and the layer combines o_pos − λ·o_neg in torch (so autograd handles λ, the sub-layer norm and everything after).
Two SDPA calls with a 2d-wide value fall off the flash kernels (value dim ≠ q/k dim) and cost about twice one standard
attention, while the FLOPs are 1.5×: QKᵀ twice at width d, PV twice at width 2d. This kernel makes one pass over the
keys per query block with two online softmaxes (running max and sum for each map) and the shared V tile,
FlashAttention-2 style; the backward recomputes both maps from the saved log-sum-exps.

Masks, ANDed together when several are on:
- causal, aligned bottom-right: query i sits at key position i + S − T (a KV-cache prefill/decode), and whole key
  blocks above the diagonal are skipped;
- a sliding window: key j allowed iff 0 ≤ (i + S − T) − j < window (causal implied); blocks outside are skipped;
- an explicit boolean mask broadcastable to (B, 1, T, S), True = attend (padding, packed documents, custom 4-D masks).
A query row with no allowed key gets output 0, log-sum-exp −inf and zero gradients everywhere.
Not covered (the caller keeps its unfused path): per-head masks, logit soft-capping, attention dropout, float masks.

GQA: query head h reads KV group h // (Hd / Gd). The key/value gradient kernel loops over the query heads of its group
inside the kernel, so dk/dv are accumulated once in fp32 registers and stored in the input dtype.

Self-contained like the modeling file next to it (it is copied into every converted checkpoint): it imports only
torch at module level; Triton is optional. The kernels are plain functions here, compiled by `triton.jit` on first use,
because Triton reads TRITON_INTERPRET (its CPU interpreter, used by the tests) when a function is decorated.
"""

from __future__ import annotations  # the kernels' `constexpr` annotations stay names until Triton reads them

import os

import torch

# Imported on first use (_import_triton): Triton is optional, and it must see TRITON_INTERPRET before it is imported.
triton = tl = constexpr = None
_TRITON_MISSING = False

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_HEAD_DIM = 128  # the value is 2d wide: two (block, 2d) fp32 accumulators per program
_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------------------------------
# Kernels (compiled by _kernels(); see the module docstring for why they are not decorated here)


def _key_range(start_m, T, S, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW):
    """Key positions [lo, hi) that the query block starting at start_m can see: causal and window masks skip whole
    blocks."""
    lo = 0
    hi = S
    if CAUSAL or WINDOW:  # the block's last query sits at key position start_m + BLOCK_M − 1 + S − T
        hi = tl.minimum(hi, start_m + BLOCK_M + S - T)
    if WINDOW:  # its first query sees keys from start_m + S − T − window + 1 on
        lo = tl.maximum(lo, start_m + S - T - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


def _query_range(start_n, T, S, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW):
    """Query positions [lo, hi) that can see some key of the block starting at start_n."""
    lo = 0
    hi = T
    if CAUSAL or WINDOW:  # query i sees key j only if j ≤ i + S − T
        lo = tl.maximum(lo, start_n - (S - T))
        lo = (lo // BLOCK_M) * BLOCK_M
    if WINDOW:  # … and i + S − T − j < window, for j the block's last key
        hi = tl.minimum(hi, start_n + BLOCK_N - 1 + window - (S - T))
    return lo, hi


def _allowed_tile(MASK, stride_mt, stride_ms, offs_m, offs_n, T, S, window, CAUSAL, WINDOW, HAS_MASK):
    """(BLOCK_M, BLOCK_N) bool: which (query, key) pairs of the tile attend."""
    in_bounds = (offs_m[:, None] < T) & (offs_n[None, :] < S)
    behind = offs_m[:, None] + (S - T) - offs_n[None, :]  # how far the key lies behind the query
    allowed = in_bounds
    if CAUSAL or WINDOW:
        allowed = allowed & (behind >= 0)
    if WINDOW:
        allowed = allowed & (behind < window)
    if HAS_MASK:
        explicit = tl.load(MASK + offs_m[:, None] * stride_mt + offs_n[None, :] * stride_ms, mask=in_bounds, other=0)
        allowed = allowed & (explicit != 0)
    return allowed


def _key_tiles(KP, KN, V, offs_n, offs_d, offs_dv, stride_ks, stride_vs, S, head_dim, value_dim):
    """k_pos, k_neg (BLOCK_N, BLOCK_D) and v (BLOCK_N, BLOCK_DV) of one key block (pointers at its batch and group),
    zero outside the tensors."""
    k_at = offs_n[:, None] * stride_ks + offs_d[None, :]
    k_in = (offs_n[:, None] < S) & (offs_d[None, :] < head_dim)
    v = tl.load(V + offs_n[:, None] * stride_vs + offs_dv[None, :],
                mask=(offs_n[:, None] < S) & (offs_dv[None, :] < value_dim), other=0.0)
    return tl.load(KP + k_at, mask=k_in, other=0.0), tl.load(KN + k_at, mask=k_in, other=0.0), v


def _query_tiles(QP, QN, DOP, DON, LSEP, LSEN, DELTAP, DELTAN, batch, head, offs_m, offs_d, offs_dv,
                 stride_qb, stride_qh, stride_qt, stride_ob, stride_oh, stride_ot, num_heads, T, head_dim, value_dim):
    """What the backward reads of one query block of one head: q_pos, q_neg, dO_pos, dO_neg, the two log-sum-exps in
    log2 units and the two deltas rowsum(dO ∘ O)."""
    q_at = batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q_in = (offs_m[:, None] < T) & (offs_d[None, :] < head_dim)
    do_at = batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_ot + offs_dv[None, :]
    do_in = (offs_m[:, None] < T) & (offs_dv[None, :] < value_dim)
    row_at = (batch * num_heads + head) * T + offs_m
    rows = offs_m < T
    return (
        tl.load(QP + q_at, mask=q_in, other=0.0), tl.load(QN + q_at, mask=q_in, other=0.0),
        tl.load(DOP + do_at, mask=do_in, other=0.0), tl.load(DON + do_at, mask=do_in, other=0.0),
        tl.load(LSEP + row_at, mask=rows, other=0.0) * 1.4426950408889634,
        tl.load(LSEN + row_at, mask=rows, other=0.0) * 1.4426950408889634,
        tl.load(DELTAP + row_at, mask=rows, other=0.0), tl.load(DELTAN + row_at, mask=rows, other=0.0),
    )


def _mma(a, b, DOT):
    """tl.dot with the operand precision DOT: "ieee" (fp32 inputs stay fp32, no TF32), "tf32" (16-bit inputs), or
    "upcast": Triton's CPU interpreter multiplies bf16 bit patterns as integers, so there the (already rounded)
    operands are multiplied in fp32."""
    if DOT == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT)


def _online_softmax_step(scores, v, m, l, acc, DOT):
    """One key block of an online softmax (scores in log2 units, −inf where masked): running max m, sum l and
    output accumulator acc, rescaled to the new max. A row with no allowed key so far keeps m = −inf, l = 0, acc = 0."""
    m_new = tl.maximum(m, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT)
    return m_new, l, acc


def _probabilities_and_score_grads(q, k, v, do, lse2, delta, allowed, qk_scale, DOT):
    """Recomputed probabilities P (BLOCK_M, BLOCK_N) of one map and dS = P ∘ (dO·Vᵀ − rowsum(dO ∘ O)); lse2 is the
    log-sum-exp in log2 units. Masked pairs (and rows with no allowed key) get P = 0 and dS = 0."""
    scores = _mma(q, tl.trans(k), DOT) * qk_scale
    p = tl.where(allowed, tl.exp2(scores - lse2[:, None]), 0.0)
    dp = _mma(do, tl.trans(v), DOT)
    return p, p * (dp - delta[:, None])


def _forward_kernel(
    QP, QN, KP, KN, V, MASK, OP, ON, LSEP, LSEN,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mt, stride_ms, stride_ob, stride_oh, stride_ot,
    num_heads, group_size, T, S, head_dim, value_dim, qk_scale, window,
    CAUSAL: constexpr, WINDOW: constexpr, HAS_MASK: constexpr, DOT: constexpr,
    BLOCK_M: constexpr, BLOCK_N: constexpr, BLOCK_D: constexpr, BLOCK_DV: constexpr,
):
    """One program per (query block, batch × head): both maps against the shared V in one pass over the keys."""
    start_m = tl.program_id(0) * BLOCK_M
    batch, head = tl.program_id(1) // num_heads, tl.program_id(1) % num_heads
    group = head // group_size
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d, offs_dv, offs_n0 = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV), tl.arange(0, BLOCK_N)
    q_at = batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q_in = (offs_m[:, None] < T) & (offs_d[None, :] < head_dim)
    q_pos = tl.load(QP + q_at, mask=q_in, other=0.0)
    q_neg = tl.load(QN + q_at, mask=q_in, other=0.0)
    KP += batch * stride_kb + group * stride_kh
    KN += batch * stride_kb + group * stride_kh
    V += batch * stride_vb + group * stride_vh
    MASK += batch * stride_mb

    m_pos = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m_neg = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_pos = tl.zeros([BLOCK_M], tl.float32)
    l_neg = tl.zeros([BLOCK_M], tl.float32)
    acc_pos = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc_neg = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lo, hi = _key_range(start_m, T, S, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        allowed = _allowed_tile(MASK, stride_mt, stride_ms, offs_m, offs_n, T, S, window, CAUSAL, WINDOW, HAS_MASK)
        k_pos, k_neg, v = _key_tiles(KP, KN, V, offs_n, offs_d, offs_dv, stride_ks, stride_vs, S, head_dim, value_dim)
        s_pos = tl.where(allowed, _mma(q_pos, tl.trans(k_pos), DOT) * qk_scale, float("-inf"))
        s_neg = tl.where(allowed, _mma(q_neg, tl.trans(k_neg), DOT) * qk_scale, float("-inf"))
        m_pos, l_pos, acc_pos = _online_softmax_step(s_pos, v, m_pos, l_pos, acc_pos, DOT)
        m_neg, l_neg, acc_neg = _online_softmax_step(s_neg, v, m_neg, l_neg, acc_neg, DOT)

    o_at = batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_ot + offs_dv[None, :]
    o_in = (offs_m[:, None] < T) & (offs_dv[None, :] < value_dim)
    tl.store(OP + o_at, (acc_pos / tl.where(l_pos == 0.0, 1.0, l_pos)[:, None]).to(OP.dtype.element_ty), mask=o_in)
    tl.store(ON + o_at, (acc_neg / tl.where(l_neg == 0.0, 1.0, l_neg)[:, None]).to(ON.dtype.element_ty), mask=o_in)
    # natural-log log-sum-exp of the scaled scores; −inf for a row with no allowed key
    lse_at = (batch * num_heads + head) * T + offs_m
    lse_pos = tl.where(l_pos == 0.0, float("-inf"), m_pos + tl.log2(tl.where(l_pos == 0.0, 1.0, l_pos)))
    lse_neg = tl.where(l_neg == 0.0, float("-inf"), m_neg + tl.log2(tl.where(l_neg == 0.0, 1.0, l_neg)))
    tl.store(LSEP + lse_at, lse_pos / 1.4426950408889634, mask=offs_m < T)
    tl.store(LSEN + lse_at, lse_neg / 1.4426950408889634, mask=offs_m < T)


def _backward_query_kernel(
    QP, QN, KP, KN, V, MASK, DOP, DON, LSEP, LSEN, DELTAP, DELTAN, DQP, DQN,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mt, stride_ms, stride_ob, stride_oh, stride_ot, stride_gb, stride_gh, stride_gt,
    num_heads, group_size, T, S, head_dim, value_dim, scale, qk_scale, window,
    CAUSAL: constexpr, WINDOW: constexpr, HAS_MASK: constexpr, DOT: constexpr,
    BLOCK_M: constexpr, BLOCK_N: constexpr, BLOCK_D: constexpr, BLOCK_DV: constexpr,
):
    """dq_pos, dq_neg for one (query block, batch × head); the same pass over the keys as the forward.
    Strides: q (also of dq: stride_g*), k, v, mask, and o (also of dO); lse/delta are contiguous (B, Hd, T)."""
    start_m = tl.program_id(0) * BLOCK_M
    batch, head = tl.program_id(1) // num_heads, tl.program_id(1) % num_heads
    group = head // group_size
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d, offs_dv, offs_n0 = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV), tl.arange(0, BLOCK_N)
    q_pos, q_neg, do_pos, do_neg, lse2_pos, lse2_neg, delta_pos, delta_neg = _query_tiles(
        QP, QN, DOP, DON, LSEP, LSEN, DELTAP, DELTAN, batch, head, offs_m, offs_d, offs_dv,
        stride_qb, stride_qh, stride_qt, stride_ob, stride_oh, stride_ot, num_heads, T, head_dim, value_dim)
    KP += batch * stride_kb + group * stride_kh
    KN += batch * stride_kb + group * stride_kh
    V += batch * stride_vb + group * stride_vh
    MASK += batch * stride_mb

    dq_pos = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq_neg = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(start_m, T, S, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        allowed = _allowed_tile(MASK, stride_mt, stride_ms, offs_m, offs_n, T, S, window, CAUSAL, WINDOW, HAS_MASK)
        k_pos, k_neg, v = _key_tiles(KP, KN, V, offs_n, offs_d, offs_dv, stride_ks, stride_vs, S, head_dim, value_dim)
        _, ds_pos = _probabilities_and_score_grads(q_pos, k_pos, v, do_pos, lse2_pos, delta_pos, allowed, qk_scale,
                                                   DOT)
        _, ds_neg = _probabilities_and_score_grads(q_neg, k_neg, v, do_neg, lse2_neg, delta_neg, allowed, qk_scale,
                                                   DOT)
        dq_pos += _mma(ds_pos.to(k_pos.dtype), k_pos, DOT)
        dq_neg += _mma(ds_neg.to(k_neg.dtype), k_neg, DOT)

    dq_at = batch * stride_gb + head * stride_gh + offs_m[:, None] * stride_gt + offs_d[None, :]
    dq_in = (offs_m[:, None] < T) & (offs_d[None, :] < head_dim)
    tl.store(DQP + dq_at, (dq_pos * scale).to(DQP.dtype.element_ty), mask=dq_in)
    tl.store(DQN + dq_at, (dq_neg * scale).to(DQN.dtype.element_ty), mask=dq_in)


def _backward_key_kernel(
    QP, QN, KP, KN, V, MASK, DOP, DON, LSEP, LSEN, DELTAP, DELTAN, DKP, DKN, DV,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mt, stride_ms, stride_ob, stride_oh, stride_ot, stride_gb, stride_gh, stride_gs,
    num_heads, group_size, T, S, head_dim, value_dim, scale, qk_scale, window,
    CAUSAL: constexpr, WINDOW: constexpr, HAS_MASK: constexpr, DOT: constexpr,
    BLOCK_M: constexpr, BLOCK_N: constexpr, BLOCK_D: constexpr, BLOCK_DV: constexpr,
):
    """dk_pos, dk_neg, dv for one (key block, batch × KV group), summed over the group's query heads in registers:
    dv = P_posᵀ·dO_pos + P_negᵀ·dO_neg, dk = dSᵀ·q·scale. dk is stored with the strides stride_g*, dv with those
    of v (it is allocated like v)."""
    start_n = tl.program_id(0) * BLOCK_N
    num_groups = num_heads // group_size
    batch, group = tl.program_id(1) // num_groups, tl.program_id(1) % num_groups
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d, offs_dv, offs_m0 = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV), tl.arange(0, BLOCK_M)
    k_base, v_base = batch * stride_kb + group * stride_kh, batch * stride_vb + group * stride_vh
    k_pos, k_neg, v = _key_tiles(KP + k_base, KN + k_base, V + v_base, offs_n, offs_d, offs_dv, stride_ks, stride_vs,
                                 S, head_dim, value_dim)
    MASK += batch * stride_mb

    dk_pos = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dk_neg = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo, hi = _query_range(start_n, T, S, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    for head in range(group * group_size, (group + 1) * group_size):
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            q_pos, q_neg, do_pos, do_neg, lse2_pos, lse2_neg, delta_pos, delta_neg = _query_tiles(
                QP, QN, DOP, DON, LSEP, LSEN, DELTAP, DELTAN, batch, head, offs_m, offs_d, offs_dv,
                stride_qb, stride_qh, stride_qt, stride_ob, stride_oh, stride_ot, num_heads, T, head_dim, value_dim)
            allowed = _allowed_tile(MASK, stride_mt, stride_ms, offs_m, offs_n, T, S, window, CAUSAL, WINDOW,
                                    HAS_MASK)
            p_pos, ds_pos = _probabilities_and_score_grads(q_pos, k_pos, v, do_pos, lse2_pos, delta_pos, allowed,
                                                           qk_scale, DOT)
            p_neg, ds_neg = _probabilities_and_score_grads(q_neg, k_neg, v, do_neg, lse2_neg, delta_neg, allowed,
                                                           qk_scale, DOT)
            dv += _mma(tl.trans(p_pos.to(v.dtype)), do_pos, DOT)
            dv += _mma(tl.trans(p_neg.to(v.dtype)), do_neg, DOT)
            dk_pos += _mma(tl.trans(ds_pos.to(q_pos.dtype)), q_pos, DOT)
            dk_neg += _mma(tl.trans(ds_neg.to(q_neg.dtype)), q_neg, DOT)

    dk_at = batch * stride_gb + group * stride_gh + offs_n[:, None] * stride_gs + offs_d[None, :]
    dk_in = (offs_n[:, None] < S) & (offs_d[None, :] < head_dim)
    tl.store(DKP + dk_at, (dk_pos * scale).to(DKP.dtype.element_ty), mask=dk_in)
    tl.store(DKN + dk_at, (dk_neg * scale).to(DKN.dtype.element_ty), mask=dk_in)
    dv_at = v_base + offs_n[:, None] * stride_vs + offs_dv[None, :]  # dv is allocated like v
    tl.store(DV + dv_at, dv.to(DV.dtype.element_ty), mask=(offs_n[:, None] < S) & (offs_dv[None, :] < value_dim))


_HELPERS = ("_key_tiles", "_query_tiles", "_mma", "_key_range", "_query_range", "_allowed_tile", "_online_softmax_step",
            "_probabilities_and_score_grads")
_KERNELS = {}


def _import_triton() -> bool:
    """Whether Triton can be imported (importing it into this module's namespace, where the kernels find `tl`)."""
    global triton, tl, constexpr, _TRITON_MISSING
    if triton is None and not _TRITON_MISSING:
        try:
            import triton
            import triton.language as tl
            from triton.language import constexpr
        except ImportError:
            _TRITON_MISSING = True
    return triton is not None


def _kernels() -> dict:
    """The compiled kernels, built on first use. The helpers are replaced in this module's namespace by their jitted
    versions because the kernels look their callees up there when Triton compiles them."""
    if not _KERNELS:
        for name in _HELPERS:
            globals()[name] = triton.jit(globals()[name])
        for name in ("_forward_kernel", "_backward_query_kernel", "_backward_key_kernel"):
            _KERNELS[name] = triton.jit(globals()[name])
    return _KERNELS


# ---------------------------------------------------------------------------------------------------------------------
# Host side


def interpreter_mode() -> bool:
    """Triton's CPU interpreter is on (TRITON_INTERPRET=1): kernels run on CPU tensors, slowly, for testing."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def unsupported_reason(q_pos, q_neg, k_pos, k_neg, value, mask=None, *, window=None, dropout=0.0,
                       softcap=None) -> str | None:
    """Why the fused kernel cannot compute this call (None when it can). Shapes: q_pos, q_neg (B, Hd, T, d);
    k_pos, k_neg (B, Gd, S, d); value (B, Gd, S, 2d); mask None or bool broadcastable to (B, 1, T, S)."""
    if not _import_triton():
        return "triton is not installed"
    if q_pos.device.type != "cuda" and not (q_pos.device.type == "cpu" and interpreter_mode()):
        return f"tensors on {q_pos.device.type} (the kernel needs CUDA, or CPU with TRITON_INTERPRET=1)"
    tensors = (q_pos, q_neg, k_pos, k_neg, value)
    if any(t.device != q_pos.device for t in tensors) or (mask is not None and mask.device != q_pos.device):
        return "inputs on different devices"
    if q_pos.dtype not in _DTYPES or any(t.dtype != q_pos.dtype for t in tensors):
        return f"dtypes {[t.dtype for t in tensors]} (all must be one of float32, bfloat16, float16)"
    if any(t.ndim != 4 for t in tensors):
        return "q/k/v must be 4-D (batch, heads, length, head_dim)"
    batch, heads, length, head_dim = q_pos.shape
    groups, keys = k_pos.shape[1], k_pos.shape[2]
    if q_neg.shape != q_pos.shape or k_neg.shape != k_pos.shape or k_pos.shape[::3] != (batch, head_dim):
        return f"q/k shapes {tuple(q_pos.shape)}, {tuple(q_neg.shape)}, {tuple(k_pos.shape)}, {tuple(k_neg.shape)}"
    if tuple(value.shape) != (batch, groups, keys, 2 * head_dim):
        return f"value shape {tuple(value.shape)}, expected {(batch, groups, keys, 2 * head_dim)} (width 2·head_dim)"
    if heads % groups:
        return f"{heads} query heads are not a multiple of {groups} key/value heads"
    if head_dim > _MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {_MAX_HEAD_DIM}"
    if dropout:
        return "attention dropout"
    if softcap is not None:
        return "logit soft-capping"
    if window is not None and window < 1:
        return f"sliding window {window} < 1"
    if mask is not None:
        if mask.dtype != torch.bool:
            return f"mask dtype {mask.dtype} (pass a bool mask, True = attend)"
        if mask.ndim != 4 or mask.shape[1] != 1:
            return f"mask shape {tuple(mask.shape)}: per-head or non-4-D masks are not supported, expected (B, 1, T, S)"
        if any(m not in (1, n) for m, n in zip(mask.shape, (batch, 1, length, keys))):
            return f"mask shape {tuple(mask.shape)} does not broadcast to {(batch, 1, length, keys)}"
    return None


def kernel_supported(q_pos, q_neg, k_pos, k_neg, value, mask=None, **features) -> bool:
    """Whether split_diff_attention can compute this call (see unsupported_reason for the conditions)."""
    return unsupported_reason(q_pos, q_neg, k_pos, k_neg, value, mask, **features) is None


def _dot_precision(query: torch.Tensor) -> str:
    if query.dtype == torch.float32:
        return "ieee"
    return "upcast" if query.device.type == "cpu" else "tf32"  # "cpu": the interpreter (see _mma)


def _blocks(head_dim: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) — a guess, untuned: the per-program state is two (BLOCK_M, 2d) fp32
    accumulators, so wide heads get narrower key blocks and more warps."""
    if device.type == "cpu":  # the interpreter: small blocks, fewer wasted masked lanes on tiny test shapes
        return 16, 16, 4
    return (64, 64, 4) if head_dim <= 64 else (64, 32, 8)


class _Launch:
    """The arguments every kernel shares: tensors made last-dim contiguous, mask expanded (stride 0 where it
    broadcasts), block sizes and feature flags."""

    def __init__(self, q_pos, q_neg, k_pos, k_neg, value, mask, scale, causal, window, block_m, block_n):
        batch, heads, length, head_dim = q_pos.shape
        self.q_pos, self.q_neg = _same_strides(q_pos, q_neg)
        self.k_pos, self.k_neg = _same_strides(k_pos, k_neg)
        self.value = value.contiguous()  # dv is allocated contiguous and written where v was read
        self.shape = (batch, heads, k_pos.shape[1], length, k_pos.shape[2], head_dim)
        if mask is None:
            self.mask, self.mask_strides = self.q_pos, (0, 0, 0)  # never read (HAS_MASK is off)
        else:
            expanded = mask.expand(batch, 1, length, k_pos.shape[2])
            self.mask = expanded.view(torch.uint8)
            self.mask_strides = (expanded.stride(0), expanded.stride(2), expanded.stride(3))
        default_m, default_n, self.num_warps = _blocks(head_dim, q_pos.device)
        self.block_m, self.block_n = block_m or default_m, block_n or default_n
        self.scale = scale
        self.window = window or 0
        self.flags = dict(
            CAUSAL=bool(causal), WINDOW=window is not None, HAS_MASK=mask is not None,
            DOT=_dot_precision(q_pos),
            BLOCK_M=self.block_m, BLOCK_N=self.block_n,
            BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_DV=max(16, triton.next_power_of_2(2 * head_dim)),
        )

    def inputs(self):
        """The tensors every kernel takes first: q_pos, q_neg, k_pos, k_neg, value, mask (q_pos stands in for an
        absent mask; HAS_MASK is then off and it is never read)."""
        return self.q_pos, self.q_neg, self.k_pos, self.k_neg, self.value, self.mask

    def input_strides(self):
        """Batch, head and row strides (in elements) of q, k and value, then the mask's batch, query and key strides
        (0 where it broadcasts)."""
        return (*self.q_pos.stride()[:3], *self.k_pos.stride()[:3], *self.value.stride()[:3], *self.mask_strides)

    def sizes(self):
        """The kernels' size arguments: query heads Hd, query heads per KV group, query length T, key length S,
        head_dim d and value width 2d."""
        _, heads, groups, length, keys, head_dim = self.shape
        return heads, heads // groups, length, keys, head_dim, 2 * head_dim


def _same_strides(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels take one set of strides for a positive/negative pair (two chunks of one projection share them)."""
    if first.stride() == second.stride() and first.stride(-1) == 1:
        return first, second
    return first.contiguous(), second.contiguous()


def _forward(launch: _Launch):
    batch, heads, _, length, _, head_dim = launch.shape
    q_pos = launch.q_pos
    o_pos = torch.empty(batch, heads, length, 2 * head_dim, device=q_pos.device, dtype=q_pos.dtype)
    o_neg = torch.empty_like(o_pos)
    lse_pos = torch.empty(batch, heads, length, device=q_pos.device, dtype=torch.float32)
    lse_neg = torch.empty_like(lse_pos)
    grid = (triton.cdiv(length, launch.block_m), batch * heads)
    _kernels()["_forward_kernel"][grid](
        *launch.inputs(), o_pos, o_neg, lse_pos, lse_neg, *launch.input_strides(), *o_pos.stride()[:3],
        *launch.sizes(), launch.scale * _LOG2E, launch.window, **launch.flags, num_warps=launch.num_warps,
    )
    return o_pos, o_neg, lse_pos, lse_neg


def _backward(launch: _Launch, o_pos, o_neg, lse_pos, lse_neg, do_pos, do_neg):
    batch, heads, groups, length, keys, head_dim = launch.shape
    do_pos, do_neg = do_pos.contiguous(), do_neg.contiguous()  # strides of o (contiguous, allocated by _forward)
    delta_pos = (do_pos.float() * o_pos.float()).sum(-1)  # rowsum(dO ∘ O), (B, Hd, T) fp32
    delta_neg = (do_neg.float() * o_neg.float()).sum(-1)
    common = (*launch.inputs(), do_pos, do_neg, lse_pos, lse_neg, delta_pos, delta_neg)
    dq_pos = torch.empty(batch, heads, length, head_dim, device=do_pos.device, dtype=launch.q_pos.dtype)
    dq_neg = torch.empty_like(dq_pos)
    dk_pos = torch.empty(batch, groups, keys, head_dim, device=dq_pos.device, dtype=dq_pos.dtype)
    dk_neg = torch.empty_like(dk_pos)
    dv = torch.empty_like(launch.value)
    scalars = (*launch.sizes(), launch.scale, launch.scale * _LOG2E, launch.window)
    kernels = _kernels()
    kernels["_backward_query_kernel"][(triton.cdiv(length, launch.block_m), batch * heads)](
        *common, dq_pos, dq_neg, *launch.input_strides(), *o_pos.stride()[:3], *dq_pos.stride()[:3], *scalars,
        **launch.flags, num_warps=launch.num_warps,
    )
    kernels["_backward_key_kernel"][(triton.cdiv(keys, launch.block_n), batch * groups)](
        *common, dk_pos, dk_neg, dv, *launch.input_strides(), *o_pos.stride()[:3], *dk_pos.stride()[:3], *scalars,
        **launch.flags, num_warps=launch.num_warps,
    )
    return dq_pos, dq_neg, dk_pos, dk_neg, dv


class SplitDiffAttentionFunction(torch.autograd.Function):
    """Autograd for the fused kernel: (q_pos, q_neg, k_pos, k_neg, value) → (o_pos, o_neg)."""

    @staticmethod
    def forward(ctx, q_pos, q_neg, k_pos, k_neg, value, mask, scale, causal, window, block_m, block_n):
        """Runs the fused forward kernel and saves the inputs, both outputs and their fp32 log-sum-exps (B, Hd, T)
        for the backward. Returns (o_pos, o_neg), each (B, Hd, T, 2d) in the input dtype."""
        launch = _Launch(q_pos, q_neg, k_pos, k_neg, value, mask, scale, causal, window, block_m, block_n)
        o_pos, o_neg, lse_pos, lse_neg = _forward(launch)
        ctx.save_for_backward(q_pos, q_neg, k_pos, k_neg, value, mask, o_pos, o_neg, lse_pos, lse_neg)
        ctx.launch_args = (scale, causal, window, block_m, block_n)
        return o_pos, o_neg

    @staticmethod
    def backward(ctx, do_pos, do_neg):
        """Recomputes both maps from the saved log-sum-exps (query kernel, then key/value kernel); an output without
        a gradient counts as zero. Returns dq_pos, dq_neg, dk_pos, dk_neg, dv in the input dtype and None for the
        mask and the five scalar settings."""
        q_pos, q_neg, k_pos, k_neg, value, mask, o_pos, o_neg, lse_pos, lse_neg = ctx.saved_tensors
        launch = _Launch(q_pos, q_neg, k_pos, k_neg, value, mask, *ctx.launch_args)
        do_pos = torch.zeros_like(o_pos) if do_pos is None else do_pos
        do_neg = torch.zeros_like(o_neg) if do_neg is None else do_neg
        grads = _backward(launch, o_pos, o_neg, lse_pos, lse_neg, do_pos, do_neg)
        return (*grads, None, None, None, None, None, None)


def split_diff_attention(q_pos, q_neg, k_pos, k_neg, value, *, scale: float | None = None, causal: bool = False,
                         window: int | None = None, mask: torch.Tensor | None = None, block_m: int | None = None,
                         block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps of split-heads differential attention against one shared value, fused.

    q_pos, q_neg: (B, Hd, T, d); k_pos, k_neg: (B, Gd, S, d); value: (B, Gd, S, 2d); query head h reads KV group
    h // (Hd / Gd). scale defaults to d^−½. causal: bottom-right aligned (query i at key position i + S − T).
    window: key j allowed iff 0 ≤ (i + S − T) − j < window. mask: bool, broadcastable to (B, 1, T, S), True = attend.
    Returns o_pos, o_neg: (B, Hd, T, 2d) in the input dtype (accumulated in fp32); a query row with no allowed key
    gets 0 and passes zero gradients. Raises ValueError for an input the kernel does not cover (unsupported_reason).
    """
    reason = unsupported_reason(q_pos, q_neg, k_pos, k_neg, value, mask, window=window)
    if reason is not None:
        raise ValueError(f"split_diff_attention: unsupported input: {reason}")
    scale = q_pos.shape[-1] ** -0.5 if scale is None else float(scale)
    return SplitDiffAttentionFunction.apply(q_pos, q_neg, k_pos, k_neg, value, mask, scale, causal, window, block_m,
                                            block_n)


__all__ = ["split_diff_attention", "kernel_supported", "unsupported_reason", "interpreter_mode",
           "SplitDiffAttentionFunction"]
