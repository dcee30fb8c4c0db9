"""A plain-torch reference of the differential-attention models netmorph writes, from the papers' formulas.

It shares no code with netmorph (nor with transformers' modeling code): its own RMSNorm, rotate-half RoPE (full and
partial), GQA head mapping, boolean masks (causal, sliding window, padding, packed documents) and λ. It reads a
converted checkpoint's tensors (a state dict) and config.json (a dict), and runs in whatever dtype it is given.

Differential Transformer (Ye et al. 2024, arXiv:2410.05258, eqs. 1–3), per head:
    [Q₁; Q₂] = X W_Q,  [K₁; K₂] = X W_K,  V = X W_V
    DiffAttn(X) = (softmax(Q₁K₁ᵀ/√d) − λ · softmax(Q₂K₂ᵀ/√d)) V
    λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init
netmorph multiplies λ by a `mix` scalar (0 after conversion) and offers the paper's sub-layer norm as a per-head
RMSNorm with a learned gain (the paper's constant (1 − λ_init) factor folds into that gain). Layouts:
    doubled — q has 2H heads, k 2G heads: heads [0, H) / [0, G) are component 1, the rest component 2; V has G heads.
    split   — q/k keep H/G heads: the first halves are component 1, the second halves component 2; differential
              head j (of H/2) reads the value [v_g ‖ v_{g + G/2}] of its group g (2d wide).
DIFF V2 (Microsoft, Jan 2026): q has 2H heads over the G KV heads (one attention over all 2H), and differential head
    j = out[2j] − sigmoid(X W_λ)_j · out[2j + 1].
A query head m of n query heads over g KV heads reads KV head ⌊m / (n / g)⌋ (GQA).
RoPE (Su et al. 2021) in the rotate-half pairing: dims i and i + r/2 of the first r = head_dim · partial_rotary_factor
dims rotate by position · θ^(−2i/r).
"""

import math

import torch
import torch.nn.functional as F

LLAMA_MLP = ("gate_proj", "up_proj")


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """x / √(mean(x²) + eps) · gain over the last dim, in x's dtype."""
    return gain * (x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps))


def rotary(x: torch.Tensor, positions: torch.Tensor, rotary_dims: int, theta: float) -> torch.Tensor:
    """x (B, heads, T, d) with dims (i, i + r/2), i < r/2, rotated by angle positions · θ^(−2i/r)."""
    half = rotary_dims // 2
    frequencies = torch.tensor([theta ** (-2 * i / rotary_dims) for i in range(half)], dtype=torch.float32).double()
    angles = positions.to(torch.float64)[:, None, :, None] * frequencies  # (B, 1, T, r/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second, rest = x[..., :half], x[..., half:rotary_dims], x[..., rotary_dims:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin, rest], dim=-1)


def allowed_keys(valid: torch.Tensor, documents: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, T, T) boolean: query i may attend key j — causal, j is not padding, same document, i − j < window."""
    length = valid.shape[1]
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    allowed = (j <= i)[None] & valid[:, None, :] & (documents[:, :, None] == documents[:, None, :])
    if window is not None:
        allowed = allowed & (i - j < window)[None]
    return allowed


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor,
           scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale) v with the GQA head mapping; query (B, n, T, d), key (B, g, T, d), value (B, g, T, dv)
    → (B, n, T, dv). A query row with no allowed key (padding) gives 0."""
    n, g = query.shape[1], key.shape[1]
    group = torch.tensor([m // (n // g) for m in range(n)])
    scores = query @ key[:, group].transpose(-1, -2) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    weights = torch.nan_to_num(torch.softmax(scores, dim=-1))
    return weights @ value[:, group]


def projections(x: torch.Tensor, state: dict, prefix: str, config: dict) -> tuple:
    """q, k, v of one layer: separate q/k/v_proj, or Phi-3's fused qkv_proj whose rows are [Q; K; V]."""
    if prefix + "qkv_proj.weight" in state:
        H, G, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
        fused = linear(x, state, prefix + "qkv_proj")
        return fused[..., : H * d], fused[..., H * d: (H + G) * d], fused[..., (H + G) * d:]
    return tuple(linear(x, state, prefix + name) for name in ("q_proj", "k_proj", "v_proj"))


def heads(x: torch.Tensor, count: int) -> torch.Tensor:
    """(B, T, count·d) → (B, count, T, d)."""
    batch, length, width = x.shape
    return x.view(batch, length, count, width // count).transpose(1, 2)


def linear(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    bias = state.get(f"{name}.bias")
    return x @ state[f"{name}.weight"].T + (0 if bias is None else bias)


def attention(x: torch.Tensor, state: dict, prefix: str, config: dict, layer: int, positions: torch.Tensor,
              allowed: torch.Tensor) -> torch.Tensor:
    """One layer's attention output (B, T, hidden): plain, V1 (doubled or split) or DIFF V2 by config["diff_layout"]."""
    H, G, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    layout = config.get("diff_layout")
    scale = d ** -0.5
    q, k, v = projections(x, state, prefix, config)
    v = heads(v, G)
    q, k = heads(q, q.shape[-1] // d), heads(k, k.shape[-1] // d)
    q = rotary(q, positions, config["rotary_dims"], config["rope_theta"])
    k = rotary(k, positions, config["rotary_dims"], config["rope_theta"])
    if layout is None:  # the source model: standard attention
        out = attend(q, k, v, allowed, scale)
    elif layout == "v2":
        both = attend(q, k, v, allowed, scale)  # (B, 2H, T, d)
        lam = torch.sigmoid(linear(x, state, prefix + "lambda_proj")).transpose(1, 2)[..., None]  # (B, H, T, 1)
        out = both[:, 0::2] - lam * both[:, 1::2]
    else:
        vectors = {name: state[prefix + name] for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}
        lam = state[prefix + "mix"] * (torch.exp((vectors["lambda_q1"] * vectors["lambda_k1"]).sum())
                                       - torch.exp((vectors["lambda_q2"] * vectors["lambda_k2"]).sum())
                                       + state[prefix + "lambda_init"])
        if layout == "doubled":
            first = attend(q[:, :H], k[:, :G], v, allowed, scale)
            second = attend(q[:, H:], k[:, G:], v, allowed, scale)
        else:  # split: differential head j of group g reads [v_g ‖ v_{g + G/2}]
            wide = torch.cat([v[:, : G // 2], v[:, G // 2:]], dim=-1)
            first = attend(q[:, : H // 2], k[:, : G // 2], wide, allowed, scale)
            second = attend(q[:, H // 2:], k[:, G // 2:], wide, allowed, scale)
        out = first - lam * second
        if config.get("sublayer_norm"):
            out = rms_norm(out, state[prefix + "subln.weight"], config["rms_norm_eps"])
    batch, _, length, _ = out.shape
    return linear(out.transpose(1, 2).reshape(batch, length, -1), state, prefix + "o_proj")


def mlp(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    """SwiGLU: down(silu(gate(x)) · up(x)); Phi-3 stores gate and up as one gate_up_proj, gate first."""
    if prefix + "gate_up_proj.weight" in state:
        gate, up = linear(x, state, prefix + "gate_up_proj").chunk(2, dim=-1)
    else:
        gate, up = (linear(x, state, prefix + name) for name in LLAMA_MLP)
    return linear(F.silu(gate) * up, state, prefix + "down_proj")


def model_settings(config: dict) -> dict:
    """The settings the reference needs, read from a config.json dict as written (no transformers config class)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    family = config.get("source_model_type", config["model_type"])
    window = config.get("sliding_window")
    if config.get("layer_types"):
        windows = [window if kind == "sliding_attention" else None for kind in config["layer_types"]]
    else:
        windows = [window if family in ("mistral", "phi3") else None] * config["num_hidden_layers"]
    return {**config, "head_dim": head_dim, "num_key_value_heads": config.get("num_key_value_heads") or heads,
            "rotary_dims": int(head_dim * partial), "rope_theta": rope.get("rope_theta", config.get("rope_theta")),
            "windows": windows}


@torch.no_grad()
def reference_logits(state: dict, config: dict, input_ids: torch.Tensor, positions: torch.Tensor,
                     valid: torch.Tensor | None = None, documents: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, vocab) of a Llama-family decoder (Llama, Mistral, Qwen2, Phi-3) whose tensors are `state`
    (checkpoint names; the dtype of the tensors is the dtype of the computation) and whose config.json is `config`.
    positions (B, T) are the RoPE positions; valid (B, T) marks non-padding tokens; documents (B, T) numbers packed
    documents (attention stays inside one)."""
    settings = model_settings(config)
    valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid.bool()
    documents = torch.zeros_like(input_ids) if documents is None else documents
    eps = settings["rms_norm_eps"]
    hidden = state["model.embed_tokens.weight"][input_ids]
    for layer in range(settings["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        allowed = allowed_keys(valid, documents, settings["windows"][layer])
        normed = rms_norm(hidden, state[prefix + "input_layernorm.weight"], eps)
        hidden = hidden + attention(normed, state, prefix + "self_attn.", settings, layer, positions, allowed)
        hidden = hidden + mlp(rms_norm(hidden, state[prefix + "post_attention_layernorm.weight"], eps), state,
                              prefix + "mlp.")
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    return rms_norm(hidden, state["model.norm.weight"], eps) @ head.T


def paper_lambda_init(layer: int) -> float:
    """λ_init = 0.8 − 0.6 · exp(−0.3 · (l − 1)) for the 1-based layer l (the paper's eq. 3)."""
    return 0.8 - 0.6 * math.exp(-0.3 * (layer + 1 - 1))
