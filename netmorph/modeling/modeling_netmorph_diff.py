"""Causal LMs whose attention is differential attention (Ye et al. 2024, "Differential Transformer").

Self-contained (imports only torch and transformers): netmorph copies this file and its configuration next to every
converted checkpoint, with `auto_map` in config.json, so `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` works on a machine without netmorph — with the transformers release that machine has.

Per differential head:  out = (softmax(Q1 K1ᵀ·s) − λ · softmax(Q2 K2ᵀ·s)) · V
with                    λ = mix · (exp(λq1·λk1) − exp(λq2·λk2) + λ_init)

`mix` and `lambda_init` are persistent buffers, so a checkpoint saved during a λ warm-up reloads with the same λ.
A freshly converted checkpoint has mix = 0, where the layer computes exactly the original attention.

Every family (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, GPT-NeoX, StableLM, Falcon, GPT-2, OLMo2, Mixtral,
Qwen3-MoE, GPT-OSS, SmolLM3, Granite, OLMo3, Ministral) keeps its stock
transformers model — embeddings, norms, MLPs, residual wiring, positions, masks, KV cache and generation unchanged —
as `NetmorphDiff<Stock class>` (model_type "netmorph_diff_<family>"), with each layer's attention module replaced by
`NetmorphDiffAttention`. What differs between families inside attention is data (`AttentionFeatures`, written by the
converter into `config.diff_attention`): biases, q/k norms, scaling, logit soft-capping, sliding windows, NoPE
layers, attention sinks. Mixture-of-experts MLPs are the stock ones, loaded through the stock family's weight
conversions (transformers fuses per-expert tensors on load; `_register_weight_conversions`). Fused q/k/v
projections (Phi-3, GPT-NeoX, Falcon, GPT-2's Conv1D) are stored unfused (q_proj / k_proj / v_proj / o_proj,
nn.Linear layout) so every family has one differential layout.

What this file touches of transformers, and so what a transformers release could break (tests/test_compat.py runs
the declared floor and the newest release on every change):
- the stock `<Family>ForCausalLM` and `<Family>Config` classes by name, the attribute paths of their decoder layers
  and attention modules (stored in config.json: `diff_attention["layers"]`, `["attention"]`), `_init_weights` and
  `transformers.initialization` for models created from scratch;
- the arguments a stock decoder layer passes to its attention: hidden states, `position_embeddings` (RoPE families),
  `attention_mask`, and the KV cache under one of CACHE_ARGUMENTS (transformers 5.24 renamed `past_key_values` to
  `cache`; GPT-NeoX and Falcon say `layer_past`); an unknown cache-like argument raises instead of being dropped;
- `Cache.update(key, value, layer_idx)` (and GPT-2's `EncoderDecoderCache.self_attention_cache`);
- `ALL_ATTENTION_FUNCTIONS.get_interface(name, default)` and the attention functions' call
  `(module, query, key, value, mask, dropout=, scaling=, sliding_window=, softcap=, s_aux=, **kwargs)`;
- `transformers.conversion_mapping.get_checkpoint_conversion_mapping` / `register_checkpoint_conversion_mapping`
  (families whose stock class converts stored tensors on load: Mixtral, Qwen3-MoE);
  `ALL_MASK_ATTENTION_FUNCTIONS` (which backends get a mask); `config._attn_implementation`.

Notation in shape comments: B batch, T query length, S key length, H query heads of the source model, G its KV heads,
d head_dim.
"""

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import initialization as init
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_netmorph_diff import family_config_class
from .split_diff_kernel import split_diff_attention, unsupported_reason

# Backends that accept a value head dim different from the q/k head dim in a single call.
_WIDE_VALUE_BACKENDS = ("eager", "sdpa")
# Every name transformers 5.x has passed the KV cache under to an attention module: `past_key_values` (5.0–5.23),
# `cache` (5.24 on), `layer_past` (GPT-NeoX and Falcon decoder layers).
CACHE_ARGUMENTS = ("cache", "past_key_values", "layer_past")
# Arguments whose names look cache-like but are not a cache (`cache_position`: the static cache's write positions
# before transformers 5.17 removed it; the cache computes them itself since).
_NOT_A_CACHE = ("use_cache", "cache_position")
# Keyword arguments some stock decoder layers pass to their attention that attention functions do not take.
_LAYER_ONLY_KWARGS = ("use_cache", "output_attentions", "alibi", "encoder_hidden_states", "encoder_attention_mask",
                      "cache_position")


def paper_lambda_init(layer_idx: int) -> float:
    """λ_init of the paper for a 0-based layer index: 0.8 − 0.6·exp(−0.3·layer_idx)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """x (..., d) → cat(−x₂, x₁) over the two halves of the last dim, same shape and dtype: the rotate-half of
    HF/GPT-NeoX RoPE (transformers' modeling_llama.py, https://github.com/huggingface/transformers)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF/NeoX pairing) on the first cos.shape[-1] dims of each head of x (B, heads, T, d); the
    rest passes through. Full rotary (Llama) and partial rotary (GPT-NeoX, StableLM, Phi-3) are the same function:
    the family's rotary embedding decides the width."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return (x * cos) + (rotate_half(x) * sin)
    x_rot, x_pass = x[..., :rotary], x[..., rotary:]
    return torch.cat(((x_rot * cos) + (rotate_half(x_rot) * sin), x_pass), dim=-1)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight over the last dim, computed in fp32 (as Llama's RMSNorm)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states (..., size) → the same shape: normalised in fp32, cast back to the input dtype, then ×
        weight (the result dtype is the promotion of the two)."""
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, softcap=None, s_aux=None,
                            **kwargs):
    """Explicit attention: (B, heads, T, d) query against (B, G, S, d) key/value → (B, T, heads, value_dim).
    `softcap` is Gemma2's logit soft-capping (scores → c·tanh(scores / c) before the mask). `s_aux` (heads,) are
    GPT-OSS's sink logits: one more softmax column per head, dropped after the softmax (its value is zero), as in
    transformers' gpt_oss eager_attention_forward."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    value = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        attn_weights = torch.tanh(attn_weights / softcap) * softcap
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    # Softmax in at least fp32 (half-precision scores would round), in float64 for a float64 model: fp32 would turn
    # its finfo.min mask entries into −inf and fully masked rows into NaN.
    softmax_dtype = torch.promote_types(query.dtype, torch.float32)
    if s_aux is not None:
        sinks = s_aux.to(attn_weights.dtype).reshape(1, -1, 1, 1).expand(*attn_weights.shape[:-1], 1)
        combined = torch.cat([attn_weights, sinks], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        attn_weights = nn.functional.softmax(combined, dim=-1, dtype=softmax_dtype)[..., :-1]
    else:
        attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=softmax_dtype)
    attn_weights = attn_weights.to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _looks_like_cache(value) -> bool:
    return hasattr(value, "update") and hasattr(value, "get_seq_length")


def take_cache(kwargs: dict):
    """Remove the KV cache from an attention module's keyword arguments, under whichever of CACHE_ARGUMENTS the
    caller used, and return it (None when there is none). GPT-2 may wrap it in an EncoderDecoderCache.

    Raises TypeError when two different caches are given, or when an argument not in CACHE_ARGUMENTS carries a cache
    or has a cache-like name (a transformers release that renamed the argument again): running on without the cache
    would decode every step without the past — wrong text and no error."""
    given = [kwargs.pop(name) for name in CACHE_ARGUMENTS if name in kwargs]
    caches = [cache for cache in given if cache is not None]
    if any(cache is not caches[0] for cache in caches[1:]):
        raise TypeError(f"NetmorphDiffAttention got two different KV caches (under {', '.join(CACHE_ARGUMENTS)})")
    for name, value in kwargs.items():
        cache_like_name = ("cache" in name or "past" in name) and name not in _NOT_A_CACHE
        if value is not None and (_looks_like_cache(value) or cache_like_name):
            raise TypeError(
                f"NetmorphDiffAttention got an unknown cache argument {name!r} (this modeling file knows "
                f"{', '.join(CACHE_ARGUMENTS)}): the installed transformers {transformers.__version__} is newer than "
                "this checkpoint's modeling code; copy the modeling files of a current netmorph into the checkpoint"
            )
    cache = caches[0] if caches else None
    return getattr(cache, "self_attention_cache", cache)


@dataclass(frozen=True)
class AttentionFeatures:
    """What one layer's attention does besides q/k/v/o projections and softmax, as data.

    qk_norm: "none"; "per_head" (a norm over head_dim, applied to (B, heads, T, d): Qwen3, Gemma3, StableLM's
        per-head LayerNorms); "full_width" (a norm over the whole projection, before the split into heads: OLMo2).
        The norm modules are the family's own, taken over from the stock attention; in the doubled layout the
        positive and the negative component each pass through them separately, shaped like the source's q/k.
    scaling: the factor on q·k (head_dim^−½; Gemma2/3: query_pre_attn_scalar^−½; GPT-2 may divide by layer + 1).
    softcap: logit soft-capping (Gemma2/3 attn_logit_softcapping), None for none.
    output_dropout: dropout on the attention output after o_proj (GPT-2's resid_pdrop).
    use_rope: the layer rotates q/k (False: SmolLM3's NoPE layers).
    rotary_halves: the family's cos/sin are head_dim/2 wide and rotate the pairs (x[i], x[i + d/2]) (GPT-OSS):
        rotate-half with cos/sin repeated twice.
    sinks: the layer has learned per-head sink logits (GPT-OSS), `NetmorphDiffAttention.sinks`.
    """

    num_heads: int
    num_key_value_heads: int
    head_dim: int
    qkv_bias: bool
    o_bias: bool
    scaling: float
    norm_eps: float
    sliding_window: int | None = None
    softcap: float | None = None
    qk_norm: str = "none"
    attention_dropout: float = 0.0
    output_dropout: float = 0.0
    is_causal: bool = True
    use_rope: bool = True
    rotary_halves: bool = False
    sinks: bool = False

    @classmethod
    def of_layer(cls, config, layer_idx: int) -> "AttentionFeatures":
        """The features of layer `layer_idx` from `config.diff_attention` (written by the converter)."""
        data = config.diff_attention
        return cls(
            num_heads=data["num_heads"], num_key_value_heads=data["num_key_value_heads"],
            head_dim=data["head_dim"], qkv_bias=data["qkv_bias"], o_bias=data["o_bias"],
            scaling=data["scaling"][layer_idx], norm_eps=data["norm_eps"],
            sliding_window=data["sliding_windows"][layer_idx], softcap=data.get("softcap"),
            qk_norm=data.get("qk_norm", "none"), attention_dropout=data.get("attention_dropout", 0.0),
            output_dropout=data.get("output_dropout", 0.0), is_causal=data.get("is_causal", True),
            use_rope=data["rope_layers"][layer_idx] if "rope_layers" in data else True,
            rotary_halves=data.get("rotary_halves", False), sinks=data.get("sinks", False),
        )


class NetmorphDiffAttention(nn.Module):
    """Differential attention with a standard 4-D KV cache.

    "doubled" layout: q_proj has 2H heads and k_proj 2G heads; heads [0, H) / [0, G) are the positive component
    (the source model's q/k), the rest the negative one. The KV cache holds G key heads of width 2d (both
    components side by side) and G value heads of width d: static caches preallocate keys and values with one head
    count.
    "split" layout: q_proj/k_proj keep H/G heads; the first half is positive, the second half negative, and the
    H/2 differential heads read the concatenation of the two value halves (value dim 2d).
    "v2" layout (DIFF V2): q_proj has 2H heads, K/V keep G heads; one attention call over all 2H query heads, then
    differential head j = out[2j] − sigmoid(lambda_proj(x))_j · out[2j + 1] — a per-token, per-head λ, no λ_init,
    no mix, no sub-layer norm. The KV cache and kernels are those of a standard model.

    `qk_norms`: the family's q and k norm modules (by their attribute names in the stock attention, so their
    tensors keep their names), when `features.qk_norm` is not "none".
    `sinks` (GPT-OSS): learned sink logits, one per query head of every component — (2H,) in the doubled and v2
    layouts (positive heads first; v2: in the order of the 2H query heads), (H,) in the split layout.
    """

    def __init__(self, config, layer_idx: int, qk_norms: dict[str, nn.Module] | None = None):
        super().__init__()
        features = AttentionFeatures.of_layer(config, layer_idx)
        self.config = config
        self.features = features
        self.layer_idx = layer_idx
        self.layout = config.diff_layout
        self.head_dim = features.head_dim
        self.num_heads = features.num_heads
        self.num_key_value_heads = features.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        if self.layout == "v2":  # 2H query heads share the G KV heads: paired heads 2j, 2j + 1 sit in one group
            self.num_key_value_groups = 2 * self.num_heads // self.num_key_value_heads
        self.scaling = features.scaling
        self.attention_dropout = features.attention_dropout
        self.is_causal = features.is_causal
        self.sliding_window = features.sliding_window

        q_factor = 2 if self.layout in ("doubled", "v2") else 1
        k_factor = 2 if self.layout == "doubled" else 1
        hidden, d = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(hidden, q_factor * self.num_heads * d, bias=features.qkv_bias)
        self.k_proj = nn.Linear(hidden, k_factor * self.num_key_value_heads * d, bias=features.qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * d, bias=features.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias=features.o_bias)
        self.qk_norm_names = tuple(qk_norms or ())  # (q norm, k norm) attribute names
        for name, module in (qk_norms or {}).items():
            self.add_module(name, module)
        self.sinks = nn.Parameter(torch.empty(q_factor * self.num_heads)) if features.sinks else None
        if self.layout == "v2":
            self.lambda_proj = nn.Linear(hidden, self.num_heads, bias=False)
            self.subln = None
            return

        self.lambda_q1 = nn.Parameter(torch.empty(d))
        self.lambda_k1 = nn.Parameter(torch.empty(d))
        self.lambda_q2 = nn.Parameter(torch.empty(d))
        self.lambda_k2 = nn.Parameter(torch.empty(d))
        # Persistent buffers: saved in the checkpoint, never trained by the optimizer.
        self.register_buffer("lambda_init", torch.tensor(paper_lambda_init(layer_idx)), persistent=True)
        self.register_buffer("mix", torch.tensor(1.0), persistent=True)

        value_dim = d if self.layout == "doubled" else 2 * d
        self.subln = RMSNorm(value_dim, eps=features.norm_eps) if config.sublayer_norm else None

    def lambda_full(self) -> torch.Tensor:
        """The effective λ, mix included: a scalar in fp32 (float64 for a float64 model), whatever the weights' dtype."""
        dtype = torch.promote_types(self.lambda_q1.dtype, torch.float32)
        q1, k1, q2, k2 = (vector.to(dtype) for vector in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2))
        lambda_1, lambda_2 = torch.exp(torch.sum(q1 * k1)), torch.exp(torch.sum(q2 * k2))
        return self.mix.to(dtype) * (lambda_1 - lambda_2 + self.lambda_init.to(dtype))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states (B, T, hidden) → (output (B, T, hidden), attention weights or None). The KV cache comes under
        any of CACHE_ARGUMENTS (see `take_cache`); the other keyword arguments go to the attention function."""
        cache = take_cache(kwargs)
        for name in _LAYER_ONLY_KWARGS:
            kwargs.pop(name, None)
        attention_mask = _finite_rows(attention_mask)
        query, key, value = self._project(hidden_states, position_embeddings)
        if cache is not None and self.layout == "doubled":
            # Caches (static ones preallocate keys and values with the same head count) hold one key per KV head:
            # the positive and negative components side by side, (B, G, S, 2d). Without a cache (training) the
            # keys stay (B, 2G, S, d), which saves a copy.
            key = torch.cat(key.chunk(2, dim=1), dim=-1)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        if self.config._attn_implementation == "flex_attention" and isinstance(attention_mask, torch.Tensor):
            attention_mask = _block_mask_from_tensor(attention_mask)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        call_kwargs = dict(
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        if self.features.softcap is not None:
            call_kwargs["softcap"] = self.features.softcap
        if self.layout == "v2":
            if self.sinks is not None:
                call_kwargs["s_aux"] = self.sinks
            return self._finish(*self._forward_v2(attention, hidden_states, query, key, value, attention_mask,
                                                  call_kwargs))
        query_pos, query_neg = query.chunk(2, dim=1)
        if self.layout == "doubled":
            paired = key.shape[-1] == 2 * self.head_dim  # the cache's (B, G, S, 2d) form
            key_pos, key_neg = key.chunk(2, dim=-1 if paired else 1)
            value_pos = value_neg = value
        else:
            key_pos, key_neg = key.chunk(2, dim=1)
            value_pos = value_neg = self._split_layout_value(value)

        fused = None
        if self.layout == "split" and self.sinks is None:
            fused = self._split_kernel(query_pos, query_neg, key_pos, key_neg, value_pos, attention_mask, call_kwargs)
        kwargs_pos, kwargs_neg = call_kwargs, call_kwargs
        if self.sinks is not None:  # each component's softmax with its own heads' sinks
            sinks_pos, sinks_neg = self.sinks.chunk(2)
            kwargs_pos, kwargs_neg = {**call_kwargs, "s_aux": sinks_pos}, {**call_kwargs, "s_aux": sinks_neg}
        if fused is not None:
            (out_pos, out_neg), weights_pos = fused, None
        else:
            out_pos, weights_pos = self._attend(attention, query_pos, key_pos, value_pos, attention_mask, kwargs_pos)
            out_neg, weights_neg = self._attend(attention, query_neg, key_neg, value_neg, attention_mask, kwargs_neg)
        lam = self.lambda_full().to(out_pos.dtype)
        out = out_pos - lam * out_neg  # (B, T, heads, value_dim)
        if self.subln is not None:
            out = self.subln(out)

        weights = None if weights_pos is None else weights_pos - lam * weights_neg
        return self._finish(out, weights)

    def _finish(self, out: torch.Tensor, weights: torch.Tensor | None):
        """(B, T, heads, value_dim) differential output → o_proj (and the family's output dropout)."""
        out = self.o_proj(out.reshape(*out.shape[:2], -1).contiguous())
        if self.features.output_dropout:
            out = nn.functional.dropout(out, p=self.features.output_dropout, training=self.training)
        return out, weights

    def _forward_v2(self, attention, hidden_states, query, key, value, attention_mask, call_kwargs):
        """DIFF V2: one attention call over the 2H query heads, then pairs combined with the per-token λ."""
        out, weights = attention(self, query, key, value, attention_mask, **call_kwargs)  # (B, T, 2H, d)
        lam = torch.sigmoid(self.lambda_proj(hidden_states)).to(out.dtype)  # (B, T, H)
        combined = out[:, :, 0::2] - lam.unsqueeze(-1) * out[:, :, 1::2]
        if weights is not None:  # (B, 2H, T, S): the same combination of the two maps
            weights = weights[:, 0::2] - lam.transpose(1, 2).unsqueeze(-1) * weights[:, 1::2]
        return combined, weights

    def _project(self, hidden_states, position_embeddings):
        """q, k, v as (B, heads, T, d), q/k normed (when the family norms them) and rotated (when it uses RoPE)."""
        # The source model's q/k shapes: two components in the doubled layout, one in the split layout.
        components = 2 if self.layout == "doubled" else 1
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query, key = self.q_proj(hidden_states), self.k_proj(hidden_states)
        if self.features.qk_norm == "full_width" and self.layout == "v2":
            query, key = self._norm_pairs(query), getattr(self, self.qk_norm_names[1])(key)
        elif self.features.qk_norm == "full_width":  # OLMo2: one norm over each component's whole projection
            query, key = self._norm_components(query, key, components, dim=-1)
        query = query.view(hidden_shape).transpose(1, 2)  # (B, 2H or H, T, d)
        key = key.view(hidden_shape).transpose(1, 2)  # (B, 2G or G, T, d)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, G, T, d)
        if self.features.qk_norm == "per_head" and self.layout == "v2":
            # The even and the odd query heads each pass the norm shaped like the source's H heads (StableLM's
            # per-head norms have one module per head).
            q_norm, k_norm = (getattr(self, name) for name in self.qk_norm_names)
            query = torch.stack([q_norm(query[:, 0::2]), q_norm(query[:, 1::2])], dim=2).flatten(1, 2)
            key = k_norm(key)
        elif self.features.qk_norm == "per_head":
            query, key = self._norm_components(query, key, components, dim=1)
        # None: learned absolute positions (GPT-2), added to the embeddings; use_rope False: a NoPE layer (SmolLM3)
        if position_embeddings is not None and self.features.use_rope:
            cos, sin = position_embeddings
            if self.features.rotary_halves:  # GPT-OSS: (x[i], x[i + d/2]) pairs = rotate-half with cos/sin twice
                cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
            query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        return query, key, value

    def _norm_pairs(self, query: torch.Tensor) -> torch.Tensor:
        """V2 with a full-width q norm: the even and the odd query heads each form one source-shaped projection."""
        lead, width = query.shape[:-1], query.shape[-1] // 2
        pairs = query.view(*lead, width // self.head_dim, 2, self.head_dim).transpose(-3, -2)  # (…, 2, H, d)
        normed = getattr(self, self.qk_norm_names[0])(pairs.reshape(*lead, 2, width))
        return normed.view(*lead, 2, -1, self.head_dim).transpose(-3, -2).reshape(*lead, 2 * width)

    def _norm_components(self, query, key, components: int, dim: int):
        q_norm, k_norm = (getattr(self, name) for name in self.qk_norm_names)
        query = torch.cat([q_norm(part) for part in query.chunk(components, dim=dim)], dim=dim)
        key = torch.cat([k_norm(part) for part in key.chunk(components, dim=dim)], dim=dim)
        return query, key

    @torch.no_grad()
    def branch_probabilities(self, hidden_states: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax maps (B, heads, T, T) of the positive and negative branches for a causal, unpadded sequence,
        computed with explicit fp32 math. The differential map is `pos − λ·neg` (λ = `lambda_full()`).
        For monitoring and plots only: O(T²) memory, no cache, no padding."""
        query, key, _ = self._project(hidden_states, position_embeddings)
        length = hidden_states.shape[1]
        positions = torch.arange(length, device=hidden_states.device)
        allowed = positions[None, :] <= positions[:, None]
        if self.sliding_window is not None:
            allowed &= positions[:, None] - positions[None, :] < self.sliding_window
        maps = []
        if self.layout == "v2":  # paired query heads over the same keys
            branches = [(query[:, 0::2], key), (query[:, 1::2], key)]
            sinks = (None, None) if self.sinks is None else (self.sinks[0::2], self.sinks[1::2])
        else:
            branches = zip(query.chunk(2, dim=1), key.chunk(2, dim=1))
            sinks = (None, None) if self.sinks is None else self.sinks.chunk(2)
        for (q, k), sink in zip(branches, sinks):
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            scores = (q.float() @ k.float().transpose(-1, -2)) * self.scaling
            if self.features.softcap is not None:
                scores = torch.tanh(scores / self.features.softcap) * self.features.softcap
            scores = scores.masked_fill(~allowed, float("-inf"))
            if sink is None:
                maps.append(scores.softmax(-1))
            else:  # the sink column takes its share of the mass and is dropped
                column = sink.float().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
                maps.append(torch.cat([scores, column], dim=-1).softmax(-1)[..., :-1])
        return maps[0], maps[1]

    def _split_layout_value(self, value: torch.Tensor) -> torch.Tensor:
        # (B, G, S, d) → (B, G/2, S, 2d): differential head j reads [v_g ‖ v_{g+G/2}] for its group g.
        value_first, value_second = value.chunk(2, dim=1)
        return torch.cat([value_first, value_second], dim=-1)

    def _split_kernel(self, query_pos, query_neg, key_pos, key_neg, value, attention_mask, call_kwargs):
        """Both maps of the split layout in one fused Triton kernel (split_diff_kernel.py): about 1.5× the FLOPs of one
        attention where two SDPA calls with a 2d-wide value fall off the flash kernels. Returns (out_pos, out_neg) as
        (B, T, heads, 2d), or None to take the unfused path. It replaces the sdpa backend only (eager returns attention
        weights, flash/flex take other mask forms). NETMORPH_SPLIT_KERNEL: "off" (default, until the kernel has been
        compiled and measured on a GPU: so far it is tested in Triton's CPU interpreter only) never; "auto" uses it on
        CUDA when it covers the call; "on" always — also on CPU under TRITON_INTERPRET=1 (how the tests drive it) —
        and raises when it cannot."""
        mode = os.environ.get("NETMORPH_SPLIT_KERNEL", "off").strip().lower()
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"NETMORPH_SPLIT_KERNEL={mode!r}: use auto, on or off")
        if mode == "off" or (mode == "auto" and query_pos.device.type != "cuda"):
            return None
        implementation = self.config._attn_implementation
        allowed = _allowed_keys(attention_mask)
        if allowed is not None:  # as sdpa does: a mask may cover more key positions than the cache holds
            allowed = allowed[..., : key_pos.shape[-2]]
        if implementation != "sdpa":
            reason = f"attention implementation {implementation!r} (the kernel replaces sdpa)"
        else:
            reason = unsupported_reason(query_pos, query_neg, key_pos, key_neg, value, allowed,
                                        window=self.sliding_window, dropout=call_kwargs["dropout"],
                                        softcap=call_kwargs.get("softcap"))
        if reason is not None:
            if mode == "on":
                raise ValueError(f"NETMORPH_SPLIT_KERNEL=on, but the fused split-heads kernel cannot run: {reason}")
            return None
        # A mask from transformers already holds causality and the window; without one, the layer's own apply.
        out_pos, out_neg = split_diff_attention(
            query_pos, query_neg, key_pos, key_neg, value, scale=self.scaling, mask=allowed,
            causal=self.is_causal and allowed is None, window=self.sliding_window if allowed is None else None,
        )
        return out_pos.transpose(1, 2), out_neg.transpose(1, 2)

    def _attend(self, attention, query, key, value, attention_mask, call_kwargs):
        if value.shape[-1] == query.shape[-1] or self.config._attn_implementation in _WIDE_VALUE_BACKENDS:
            return attention(self, query, key, value, attention_mask, **call_kwargs)
        # Kernels that need equal q/k and value dims (flash, flex): one call per value half.
        halves = [attention(self, query, key, v, attention_mask, **call_kwargs) for v in value.chunk(2, dim=-1)]
        return torch.cat([out for out, _ in halves], dim=-1), None



def _init_differential(module: nn.Module, lambda_std: float, initializer_range: float = 0.02) -> None:
    """A model created from scratch (not converted): λ vectors N(0, lambda_std), the paper's λ_init, mix 1; sinks
    N(0, initializer_range) as the stock GPT-OSS initialises them."""
    if isinstance(module, NetmorphDiffAttention) and module.sinks is not None:
        init.normal_(module.sinks, 0.0, initializer_range)
    if isinstance(module, NetmorphDiffAttention) and module.layout == "v2":
        init.zeros_(module.lambda_proj.weight)  # λ = 0.5 everywhere
    elif isinstance(module, NetmorphDiffAttention):
        for vector in (module.lambda_q1, module.lambda_k1, module.lambda_q2, module.lambda_k2):
            init.normal_(vector, 0.0, lambda_std)
        init.constant_(module.lambda_init, paper_lambda_init(module.layer_idx))
        init.constant_(module.mix, 1.0)


def _block_mask_from_tensor(mask: torch.Tensor):
    """A FlexAttention BlockMask from a 4-D tensor mask (bool: True attends; float: additive). transformers would
    index the tensor inside score_mod over whole 128-blocks, reading past its end when the length is not a multiple of
    128 (memory corruption on CPU); the mask is padded with False here so every read is in bounds."""
    from torch.nn.attention.flex_attention import create_block_mask

    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    allowed = allowed.any(dim=1) if allowed.shape[1] > 1 else allowed[:, 0]  # (B, Q, K); masks are shared by heads
    batch, q_len, kv_len = allowed.shape
    padded = nn.functional.pad(allowed, (0, -kv_len % 128, 0, -q_len % 128), value=False)

    def mask_mod(b, h, q_idx, kv_idx):
        """FlexAttention mask_mod: whether query `q_idx` of batch row `b` may attend key `kv_idx` (`h` is unused: one
        mask serves every head)."""
        return padded[b, q_idx, kv_idx]

    return create_block_mask(mask_mod, batch, None, q_len, kv_len, device=mask.device)


def _allowed_keys(mask):
    """The boolean form (True = attend) of the mask sdpa receives: None, bool, or additive float (attend where the
    mask is above finfo.min / 2, the floor `_finite_rows` gives fully masked rows)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _finite_rows(mask):
    """An additive float mask whose query row is masked everywhere (the padding positions of a left-padded batch, or an
    fp32 mask cast to fp16/bf16 where finfo.min overflows to −inf) gives softmax(−inf, …) = NaN, and the NaN spreads
    through the batch in the backward pass. Such rows get finfo.min / 2 everywhere: uniform attention, as a stock
    model computes for them in fp32 (their outputs are padding either way), and far enough from −inf that adding
    the scores cannot overflow in half precision."""
    if not isinstance(mask, torch.Tensor) or not mask.is_floating_point():
        return mask
    floor = torch.finfo(mask.dtype).min / 2
    fully_masked = (mask <= floor).all(dim=-1, keepdim=True)
    return mask.masked_fill(fully_masked, floor)


def _check_mask_function(implementation: str, attention_mask) -> None:
    """transformers builds no mask at all for an attention function registered without a mask function: padding and
    custom masks would be silently ignored. Refuse instead of computing something else."""
    if implementation in ALL_MASK_ATTENTION_FUNCTIONS or not isinstance(attention_mask, torch.Tensor):
        return
    if attention_mask.ndim == 2 and bool(attention_mask.all()):
        return  # no padding: nothing to lose (the kernel applies causality itself)
    raise ValueError(
        f"attention implementation {implementation!r} has no mask function, so transformers would drop the attention "
        "mask: register one with transformers.AttentionMaskInterface.register(name, fn) or use sdpa/eager/flex_attention"
    )


def _has_packed_documents(position_ids: torch.Tensor) -> bool:
    """Several documents packed in one row: the positions restart (a step other than +1) somewhere."""
    return position_ids.shape[-1] > 1 and bool((position_ids[..., 1:] - position_ids[..., :-1] != 1).any())


def _model_inputs_hook(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook on the stock decoder model (the module that holds the layers).

    - Refuses an attention backend without a mask function when the batch is padded (`_check_mask_function`).
    - Packed documents (position_ids restarting inside a row, no attention mask): transformers separates them in the
      mask only when the forward has no cache object, but a stock model creates an empty one whenever `use_cache` is
      on (its config default), so a training forward would let documents attend to each other. With no cache passed
      in, nothing is lost by not creating one: the forward runs with use_cache=False and the mask separates them."""
    _check_mask_function(module.config._attn_implementation, kwargs.get("attention_mask"))
    position_ids = kwargs.get("position_ids")
    if (
        isinstance(position_ids, torch.Tensor)
        and kwargs.get("attention_mask") is None
        and all(kwargs.get(name) is None for name in CACHE_ARGUMENTS)
        and not torch.compiler.is_compiling()
        and _has_packed_documents(position_ids)
    ):
        kwargs["use_cache"] = False
    return args, kwargs


def install_differential_attention(model: nn.Module, config) -> None:
    """Replace the attention module of every decoder layer of a stock family model by `NetmorphDiffAttention`.
    `config.diff_attention["layers"]` is the path of the layer list ("gpt_neox.layers"), `["attention"]` the
    attention's attribute in a layer ("attention"), `["qk_norms"]` the attribute names of the family's q and k norm
    modules, which move into the differential attention unchanged.

    Raises ValueError naming the path when the stock model has no such module (a transformers release that renamed it)."""
    data = config.diff_attention
    try:
        layers = model.get_submodule(data["layers"])
    except AttributeError:
        raise ValueError(
            f"the stock {type(model).__mro__[1].__name__} of transformers {transformers.__version__} has no module "
            f"{data['layers']!r}, where this checkpoint's decoder layers live"
        ) from None
    for layer_idx, layer in enumerate(layers):
        stock = getattr(layer, data["attention"])
        qk_norms = {name: getattr(stock, name) for name in data.get("qk_norms", ())}
        setattr(layer, data["attention"], NetmorphDiffAttention(config, layer_idx, qk_norms))
    decoder = model.get_submodule(data["layers"].rpartition(".")[0])
    decoder.register_forward_pre_hook(_model_inputs_hook, with_kwargs=True)


# family → the stock causal-LM class name in transformers
FAMILY_MODELS = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM",
    "stablelm": "StableLmForCausalLM", "falcon": "FalconForCausalLM", "gpt2": "GPT2LMHeadModel",
    "olmo2": "Olmo2ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM", "smollm3": "SmolLM3ForCausalLM", "granite": "GraniteForCausalLM",
    "olmo3": "Olmo3ForCausalLM", "ministral": "MinistralForCausalLM",
}
_BUILT: dict[str, type] = {}


def _register_weight_conversions(family: str) -> None:
    """transformers converts some families' stored tensors on load (Mixtral's and Qwen3-MoE's per-expert weights
    into fused expert tensors), looked up by model_type — and never for remote code unless registered. The
    differential model stores the source's tensors as they are, so it registers the stock family's conversions under
    its own model_type: loading (and save_pretrained, which reverses them) behaves as for the stock class, with the
    conversions of the transformers release installed."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

    mapping = get_checkpoint_conversion_mapping(family)
    if mapping:
        register_checkpoint_conversion_mapping(f"netmorph_diff_{family}", mapping, overwrite=True)


def model_class_name(family: str) -> str:
    """"NetmorphDiff" + the family's stock causal-LM class name (KeyError for an unknown family)."""
    return "NetmorphDiff" + FAMILY_MODELS[family]


def family_model_class(family: str) -> type:
    """`NetmorphDiff<Family>ForCausalLM`: the stock causal-LM class of a family, its attention differential.
    Everything outside attention — and so every tensor name outside attention — is the stock model's. Built on first
    use, so a checkpoint imports only its own family's modeling code. Raises KeyError for an unknown family."""
    name = model_class_name(family)
    if name in _BUILT:
        return _BUILT[name]
    stock_class = getattr(transformers, FAMILY_MODELS[family])

    def __init__(self, config):
        stock_class.__init__(self, config)
        install_differential_attention(self, config)
        self.post_init()

    def _init_weights(self, module):
        stock_class._init_weights(self, module)
        _init_differential(module, self.config.lambda_std, getattr(self.config, "initializer_range", 0.02))

    _register_weight_conversions(family)

    _BUILT[name] = type(name, (stock_class,), {
        "__init__": __init__, "_init_weights": _init_weights, "config_class": family_config_class(family),
        "__module__": __name__, "__qualname__": name,
    })
    return _BUILT[name]


def __getattr__(name: str):
    for family in FAMILY_MODELS:
        if model_class_name(family) == name:
            return family_model_class(family)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["NetmorphDiffAttention", "FAMILY_MODELS", "family_model_class", *map(model_class_name, FAMILY_MODELS)]
