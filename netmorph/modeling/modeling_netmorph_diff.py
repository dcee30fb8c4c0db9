"""Causal LMs whose attention is differential attention (Ye et al. 2024, "Differential Transformer").

Self-contained (imports only torch and transformers): netmorph copies this file and its configuration next to every
converted checkpoint, with `auto_map` in config.json, so `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` works on a machine without netmorph.

Per differential head:  out = (softmax(Q1 K1ᵀ·s) − λ · softmax(Q2 K2ᵀ·s)) · V
with                    λ = mix · (exp(λq1·λk1) − exp(λq2·λk2) + λ_init)

`mix` and `lambda_init` are persistent buffers, so a checkpoint saved during a λ warm-up reloads with the same λ.
A freshly converted checkpoint has mix = 0, where the layer computes exactly the original attention.

Two kinds of model share one attention module, `NetmorphDiffAttention`:

- `NetmorphDiffForCausalLM` (model_type "netmorph_diff"): a self-contained Llama-style decoder for the Llama
  family (Llama, Mistral, Qwen2), with netmorph's own mask handling (see `NetmorphDiffModel.forward`).
- `NetmorphDiff<Family>ForCausalLM` (model_type "netmorph_diff_<family>"): the stock transformers model of the
  family (Qwen3, Gemma 1/2/3, Phi-3, GPT-NeoX, StableLM, Falcon, GPT-2, OLMo2) — its embeddings, norms, MLPs,
  residual wiring, positions and masks unchanged — with each layer's attention module replaced by
  `NetmorphDiffAttention`. What differs between families inside attention is data (`AttentionFeatures`, written
  by the converter into `config.diff_attention`): biases, q/k norms, scaling, logit soft-capping, sliding windows.
  Fused q/k/v projections (Phi-3, GPT-NeoX, Falcon, GPT-2's Conv1D) are stored unfused (q_proj / k_proj / v_proj /
  o_proj, nn.Linear layout) so every family has one differential layout.

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
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    create_causal_mask,
    create_sliding_window_causal_mask,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from .configuration_netmorph_diff import (
    NetmorphDiffConfig,
    NetmorphDiffFalconConfig,
    NetmorphDiffGemma2Config,
    NetmorphDiffGemma3TextConfig,
    NetmorphDiffGemmaConfig,
    NetmorphDiffGPT2Config,
    NetmorphDiffGPTNeoXConfig,
    NetmorphDiffOlmo2Config,
    NetmorphDiffPhi3Config,
    NetmorphDiffQwen3Config,
    NetmorphDiffStableLmConfig,
)
from .split_diff_kernel import split_diff_attention, unsupported_reason

# Backends that accept a value head dim different from the q/k head dim in a single call.
_WIDE_VALUE_BACKENDS = ("eager", "sdpa")
# Keyword arguments some stock decoder layers pass to their attention that attention functions do not take.
_LAYER_ONLY_KWARGS = ("use_cache", "output_attentions", "alibi", "encoder_hidden_states", "encoder_attention_mask")


def paper_lambda_init(layer_idx: int) -> float:
    """λ_init of the paper for a 0-based layer index: 0.8 − 0.6·exp(−0.3·layer_idx)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
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


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, softcap=None, **kwargs):
    """Explicit attention: (B, heads, T, d) query against (B, G, S, d) key/value → (B, T, heads, value_dim).
    `softcap` is Gemma2's logit soft-capping (scores → c·tanh(scores / c) before the mask)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    value = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        attn_weights = torch.tanh(attn_weights / softcap) * softcap
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


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

    @classmethod
    def of_layer(cls, config, layer_idx: int) -> "AttentionFeatures":
        data = getattr(config, "diff_attention", None)
        if data:  # a family model: the converter wrote the features, per layer where they vary
            return cls(
                num_heads=data["num_heads"], num_key_value_heads=data["num_key_value_heads"],
                head_dim=data["head_dim"], qkv_bias=data["qkv_bias"], o_bias=data["o_bias"],
                scaling=data["scaling"][layer_idx], norm_eps=data["norm_eps"],
                sliding_window=data["sliding_windows"][layer_idx], softcap=data.get("softcap"),
                qk_norm=data.get("qk_norm", "none"), attention_dropout=data.get("attention_dropout", 0.0),
                output_dropout=data.get("output_dropout", 0.0), is_causal=data.get("is_causal", True),
            )
        sliding = config.layer_types[layer_idx] == "sliding_attention"
        return cls(
            num_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
            head_dim=config.head_dim, qkv_bias=config.qkv_bias, o_bias=config.o_bias,
            scaling=config.head_dim**-0.5, norm_eps=config.rms_norm_eps,
            sliding_window=config.sliding_window if sliding else None, attention_dropout=config.attention_dropout,
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
        self.subln = LlamaRMSNorm(value_dim, eps=features.norm_eps) if config.sublayer_norm else None

    def lambda_full(self) -> torch.Tensor:
        """The effective λ (fp32 scalar), mix included."""
        lambda_1 = torch.exp(torch.sum(self.lambda_q1.float() * self.lambda_k1.float()))
        lambda_2 = torch.exp(torch.sum(self.lambda_q2.float() * self.lambda_k2.float()))
        return self.mix.float() * (lambda_1 - lambda_2 + self.lambda_init.float())

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        layer_past: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # GPT-NeoX and Falcon layers pass the cache as `layer_past`; GPT-2 may wrap it in an EncoderDecoderCache.
        cache = past_key_values if past_key_values is not None else layer_past
        cache = getattr(cache, "self_attention_cache", cache)
        for name in _LAYER_ONLY_KWARGS:
            kwargs.pop(name, None)
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
        if self.layout == "split":
            fused = self._split_kernel(query_pos, query_neg, key_pos, key_neg, value_pos, attention_mask, call_kwargs)
        if fused is not None:
            (out_pos, out_neg), weights_pos = fused, None
        else:
            out_pos, weights_pos = self._attend(attention, query_pos, key_pos, value_pos, attention_mask, call_kwargs)
            out_neg, weights_neg = self._attend(attention, query_neg, key_neg, value_neg, attention_mask, call_kwargs)
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
        if position_embeddings is not None:  # None: learned absolute positions (GPT-2), added to the embeddings
            cos, sin = position_embeddings
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
        else:
            branches = zip(query.chunk(2, dim=1), key.chunk(2, dim=1))
        for q, k in branches:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            scores = (q.float() @ k.float().transpose(-1, -2)) * self.scaling
            if self.features.softcap is not None:
                scores = torch.tanh(scores / self.features.softcap) * self.features.softcap
            maps.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1))
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


class NetmorphDiffDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: NetmorphDiffConfig, layer_idx: int):
        super().__init__()
        self.self_attn = NetmorphDiffAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class NetmorphDiffPreTrainedModel(PreTrainedModel):
    config_class = NetmorphDiffConfig
    config: NetmorphDiffConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NetmorphDiffDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    def _init_weights(self, module):
        super()._init_weights(module)
        _init_differential(module, self.config.lambda_std)


def _init_differential(module: nn.Module, lambda_std: float) -> None:
    """A model created from scratch (not converted): λ vectors N(0, lambda_std), the paper's λ_init, mix 1."""
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
        return padded[b, q_idx, kv_idx]

    return create_block_mask(mask_mod, batch, None, q_len, kv_len, device=mask.device)


def _allowed_keys(mask):
    """The boolean form (True = attend) of the mask sdpa receives: None, bool, or additive float (attend where the
    mask is above finfo.min / 2, the floor `_finite_rows` gives fully masked rows)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _check_mask_function(implementation: str, attention_mask) -> None:
    """transformers builds no mask at all for an attention function registered without a mask function: padding and
    custom masks would be silently ignored. Refuse instead of computing something else."""
    if implementation in ALL_MASK_ATTENTION_FUNCTIONS or attention_mask is None:
        return
    if attention_mask.ndim == 2 and bool(attention_mask.all()):
        return  # no padding: nothing to lose (the kernel applies causality itself)
    raise ValueError(
        f"attention implementation {implementation!r} has no mask function, so transformers would drop the attention "
        "mask: register one with transformers.AttentionMaskInterface.register(name, fn) or use sdpa/eager/flex_attention"
    )


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


class NetmorphDiffModel(NetmorphDiffPreTrainedModel):
    def __init__(self, config: NetmorphDiffConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [NetmorphDiffDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[None]

        # `generate` may pass the masks already built, one per layer type.
        if not isinstance(mask_by_layer_type := attention_mask, dict):
            _check_mask_function(self.config._attn_implementation, attention_mask)
            mask_kwargs = dict(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                # An empty cache gives the same mask sizes as none, and without it transformers detects documents
                # packed via position_ids (it skips that detection whenever a cache object exists).
                past_key_values=past_key_values if past_seen > 0 else None,
                position_ids=position_ids,
            )
            mask_by_layer_type = {"full_attention": create_causal_mask(**mask_kwargs)}
            if "sliding_attention" in self.config.layer_types:
                mask_by_layer_type["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        mask_by_layer_type = {kind: _finite_rows(mask) for kind, mask in mask_by_layer_type.items()}

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer, layer_type in zip(self.layers, self.config.layer_types):
            hidden_states = layer(
                hidden_states,
                attention_mask=mask_by_layer_type[layer_type],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                **kwargs,
            )
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states),
            past_key_values=past_key_values if use_cache else None,
        )


class NetmorphDiffForCausalLM(NetmorphDiffPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: NetmorphDiffConfig):
        super().__init__(config)
        self.model = NetmorphDiffModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)


def install_differential_attention(model: nn.Module, config) -> None:
    """Replace the attention module of every decoder layer of a stock family model by `NetmorphDiffAttention`.
    `config.diff_attention["layers"]` is the path of the layer list ("gpt_neox.layers"), `["attention"]` the
    attention's attribute in a layer ("attention"), `["qk_norms"]` the attribute names of the family's q and k norm
    modules, which move into the differential attention unchanged."""
    data = config.diff_attention
    for layer_idx, layer in enumerate(model.get_submodule(data["layers"])):
        stock = getattr(layer, data["attention"])
        qk_norms = {name: getattr(stock, name) for name in data.get("qk_norms", ())}
        setattr(layer, data["attention"], NetmorphDiffAttention(config, layer_idx, qk_norms))


def family_model_class(config_class: type, stock_class: type) -> type:
    """`NetmorphDiff<Family>ForCausalLM`: the stock causal-LM class of a family, its attention differential.
    Everything outside attention — and so every tensor name outside attention — is the stock model's."""

    def __init__(self, config):
        stock_class.__init__(self, config)
        install_differential_attention(self, config)
        self.post_init()

    def _init_weights(self, module):
        stock_class._init_weights(self, module)
        _init_differential(module, self.config.lambda_std)

    name = f"NetmorphDiff{stock_class.__name__}"
    return type(name, (stock_class,), {"__init__": __init__, "_init_weights": _init_weights,
                                       "config_class": config_class, "__module__": __name__, "__qualname__": name})


NetmorphDiffQwen3ForCausalLM = family_model_class(NetmorphDiffQwen3Config, transformers.Qwen3ForCausalLM)
NetmorphDiffGemmaForCausalLM = family_model_class(NetmorphDiffGemmaConfig, transformers.GemmaForCausalLM)
NetmorphDiffGemma2ForCausalLM = family_model_class(NetmorphDiffGemma2Config, transformers.Gemma2ForCausalLM)
NetmorphDiffGemma3ForCausalLM = family_model_class(NetmorphDiffGemma3TextConfig, transformers.Gemma3ForCausalLM)
NetmorphDiffPhi3ForCausalLM = family_model_class(NetmorphDiffPhi3Config, transformers.Phi3ForCausalLM)
NetmorphDiffGPTNeoXForCausalLM = family_model_class(NetmorphDiffGPTNeoXConfig, transformers.GPTNeoXForCausalLM)
NetmorphDiffStableLmForCausalLM = family_model_class(NetmorphDiffStableLmConfig, transformers.StableLmForCausalLM)
NetmorphDiffFalconForCausalLM = family_model_class(NetmorphDiffFalconConfig, transformers.FalconForCausalLM)
NetmorphDiffGPT2LMHeadModel = family_model_class(NetmorphDiffGPT2Config, transformers.GPT2LMHeadModel)
NetmorphDiffOlmo2ForCausalLM = family_model_class(NetmorphDiffOlmo2Config, transformers.Olmo2ForCausalLM)

# source model_type → the converted model's class
FAMILY_MODELS = {
    cls.config_class.source_family: cls
    for cls in (
        NetmorphDiffQwen3ForCausalLM, NetmorphDiffGemmaForCausalLM, NetmorphDiffGemma2ForCausalLM,
        NetmorphDiffGemma3ForCausalLM, NetmorphDiffPhi3ForCausalLM, NetmorphDiffGPTNeoXForCausalLM,
        NetmorphDiffStableLmForCausalLM, NetmorphDiffFalconForCausalLM, NetmorphDiffGPT2LMHeadModel,
        NetmorphDiffOlmo2ForCausalLM,
    )
}

__all__ = ["NetmorphDiffForCausalLM", "NetmorphDiffModel", "NetmorphDiffPreTrainedModel", "FAMILY_MODELS",
           *(cls.__name__ for cls in FAMILY_MODELS.values())]
