"""netmorph's differential-attention models inside vLLM (Ye et al. 2024, "Differential Transformer", and DIFF V2).

`NetmorphDiffForCausalLM` is vLLM's own `LlamaForCausalLM` (embeddings, RMSNorm, SiLU-gated MLP, RoPE, LM head,
paged KV cache, scheduler, sampling) whose decoder layers carry `NetmorphDiffVllmAttention`. It serves the families
in `SERVED_FAMILIES` (Llama, Mistral, Qwen2: the Llama-shaped ones; their differences — q/k/v and o biases, sliding
windows, scaling — are data in `config.diff_attention`). It reads the checkpoint netmorph wrote, tensor names
included (q_proj / k_proj / v_proj / o_proj, lambda_q1 / k1 / q2 / k2, lambda_init, mix, subln, lambda_proj).

Per differential head, as in netmorph/modeling/modeling_netmorph_diff.py:
    V1:  out = (softmax(Q1 K1ᵀ·s) − λ · softmax(Q2 K2ᵀ·s)) · V,   λ = mix · (exp(λq1·λk1) − exp(λq2·λk2) + λ_init)
    V2:  out_j = o_{2j} − sigmoid(lambda_proj(x))_j · o_{2j+1}  over 2H query heads sharing the source's KV heads.

Notation: T tokens of the batch (vLLM flattens the batch), H query heads and G KV heads of the source model, d its
head_dim. "KV-cache bytes" are per token and layer, in units of the source model's 2·G·d.

How each layout maps onto vLLM's paged attention — always ONE `Attention` (one KV cache, one kernel call) per layer:

    layout   query heads        KV heads        head size   KV-cache   QK / PV FLOPs vs source
    v2       2H (pairs 2j,2j+1)  G               d           1×         2× / 2×   (inherent to DIFF V2)
    doubled  2H [Q1 | Q2]        2G [K1 | K2],   d           2×         2× / 2×
                                 V repeated
    split    H, interleaved      G/2, [K1 ‖ K2]  2d          1×         2× / 2×   (half the QK products are zeros)
             [q1,0] / [0,q2]     and [V1 ‖ V2]

The V1 choice, per layout, by KV-cache memory and compute (the two mappings the field uses are one attention over
zero-padded 2d-wide heads, and one attention per component):
- split: its value heads are 2d wide anyway ([v_g ‖ v_{g+G/2}]), so padding the queries to 2d ([q1, 0] and [0, q2])
  over keys [k1 ‖ k2] costs no cache: G/2 heads of 2d keys and values = the source's cache (1×), with QK and PV work
  2× a source layer (half the QK products multiply zeros). One attention per component caches each component's keys
  and the shared 2d-wide value again: 2 × (G/2·d + G/2·2d) = 1.5× where a backend takes a value wider than the key,
  2× on CPU (K and V of one head size: one call per value half), for the same FLOPs in two or four kernel calls.
- doubled: K1 and K2 are distinct d-wide heads over one d-wide V. Zero padding to 2d would need 2d-wide value heads
  on CPU (vLLM's CPU cache stores K and V with one head size): G·2d keys + G·2d values = 2× cache at 4× the QK and PV
  FLOPs of the source. One attention per component is 2× cache at 2× FLOPs — and is what is used here, fused into one
  Attention: the 2H query heads [Q1 | Q2] over 2G KV heads [K1 | K2] with V repeated; GQA's head grouping (group
  size H/G) sends query head i < H to K1's head i·G/H and head H + i to K2's, so both components run in one kernel
  call and one cache write (the value is stored twice: that is the 2×; a backend with per-component value sharing
  would need 1.5×, vLLM has none).
- v2 needs no choice: the paired query heads are ordinary query heads of one GQA group over the source's K/V.

Tensor parallelism (GPU only, untested until a GPU is lent): V2 shards like a stock model when H % tp == 0 (a query
pair never straddles two ranks; its λ row is sharded with it). The V1 layouts order heads by component, which a
contiguous shard would separate, so they refuse tp > 1 with a one-line error.
"""

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from netmorph.integrations.vllm import check_servable
from netmorph.modeling.modeling_netmorph_diff import AttentionFeatures

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """netmorph's sub-layer norm: weight · x / sqrt(mean(x²) + eps) over the last dim, computed in fp32 and cast back
    before the gain (as netmorph.modeling.modeling_netmorph_diff.RMSNorm and Llama's RMSNorm)."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class NetmorphDiffVllmAttention(nn.Module):
    """One layer's differential attention over vLLM's paged KV cache (see the module docstring for the mapping).

    Called as `forward(positions (T,), hidden_states (T, hidden)) → (T, hidden)` in the model's dtype. Takes
    LlamaDecoderLayer's keyword arguments (its `attn_layer_type` hook) and reads everything it needs from
    `config.diff_attention` and `config.diff_layout`, not from the Llama-specific ones."""

    def __init__(self, config, hidden_size: int, num_heads: int, num_kv_heads: int,
                 max_position_embeddings: int = 8192, quant_config=None, bias: bool = False,
                 bias_o_proj: bool = False, cache_config=None, prefix: str = "", attn_type=None) -> None:
        super().__init__()
        del num_heads, num_kv_heads, bias, bias_o_proj, attn_type  # Llama's reading of the config; ours is below
        tp_size = get_tensor_model_parallel_world_size()
        check_servable(config, tp_size)
        layer_idx = extract_layer_index(prefix)
        features = AttentionFeatures.of_layer(config, layer_idx)
        self.layout = config.diff_layout
        self.heads, self.kv_heads, self.head_dim = features.num_heads, features.num_key_value_heads, features.head_dim
        self.norm_eps = features.norm_eps
        d, heads, kv_heads = self.head_dim, self.heads, self.kv_heads
        self.rotary_emb = get_rope(d, max_position=max_position_embeddings,
                                   rope_parameters=getattr(config, "rope_parameters", None), is_neox_style=True)
        common = dict(quant_config=quant_config)
        if self.layout == "v2":
            # 2H query heads (pairs adjacent) over the source's G KV heads: the stock fused projection, TP-shardable.
            self.qkv_proj = QKVParallelLinear(hidden_size, d, 2 * heads, kv_heads, bias=features.qkv_bias,
                                              prefix=f"{prefix}.qkv_proj", **common)
            self.lambda_proj = ColumnParallelLinear(hidden_size, heads, bias=False, prefix=f"{prefix}.lambda_proj",
                                                    **common)
            self.local_heads = heads // tp_size
            self.q_size = 2 * self.local_heads * d
            self.kv_size = max(1, kv_heads // tp_size) * d
            self.attn = Attention(2 * self.local_heads, d, features.scaling, num_kv_heads=max(1, kv_heads // tp_size),
                                  cache_config=cache_config, per_layer_sliding_window=features.sliding_window,
                                  prefix=f"{prefix}.attn", **common)
        else:
            q_factor, k_factor = (2, 2) if self.layout == "doubled" else (1, 1)
            linear = dict(bias=features.qkv_bias, **common)
            self.q_proj = ColumnParallelLinear(hidden_size, q_factor * heads * d, prefix=f"{prefix}.q_proj", **linear)
            self.k_proj = ColumnParallelLinear(hidden_size, k_factor * kv_heads * d, prefix=f"{prefix}.k_proj",
                                               **linear)
            self.v_proj = ColumnParallelLinear(hidden_size, kv_heads * d, prefix=f"{prefix}.v_proj", **linear)
            if self.layout == "doubled":  # [Q1 | Q2] over [K1 | K2] with V repeated: 2H / 2G heads of d
                self.attn = Attention(2 * heads, d, features.scaling, num_kv_heads=2 * kv_heads,
                                      cache_config=cache_config, per_layer_sliding_window=features.sliding_window,
                                      prefix=f"{prefix}.attn", **common)
            else:  # split: H interleaved zero-padded query heads of 2d over G/2 heads [K1 ‖ K2], [V1 ‖ V2]
                self.attn = Attention(heads, 2 * d, features.scaling, num_kv_heads=kv_heads // 2,
                                      cache_config=cache_config, per_layer_sliding_window=features.sliding_window,
                                      prefix=f"{prefix}.attn", **common)
            # λ's parameters and buffers, in the model's dtype as transformers loads them; λ is computed in fp32.
            self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
                nn.Parameter(torch.empty(d), requires_grad=False) for _ in range(4))
            self.lambda_init = nn.Parameter(torch.empty(()), requires_grad=False)
            self.mix = nn.Parameter(torch.empty(()), requires_grad=False)
            value_dim = d if self.layout == "doubled" else 2 * d
            self.subln = None
            if config.sublayer_norm:
                self.subln = nn.Module()
                self.subln.weight = nn.Parameter(torch.empty(value_dim), requires_grad=False)
        self.o_proj = RowParallelLinear(heads * d, hidden_size, bias=features.o_bias, prefix=f"{prefix}.o_proj",
                                        **common)

    def lambda_full(self) -> torch.Tensor:
        """λ = mix · (exp(λq1·λk1) − exp(λq2·λk2) + λ_init): a 0-dim fp32 tensor (V1 layouts)."""
        q1, k1, q2, k2 = (v.float() for v in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2))
        return self.mix.float() * (torch.exp(torch.sum(q1 * k1)) - torch.exp(torch.sum(q2 * k2))
                                   + self.lambda_init.float())

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Differential attention of a flattened batch: positions [tokens] (int64), hidden_states [tokens, hidden]
        → [tokens, hidden], through one vLLM `Attention` (paged KV cache) per layer in the layout's mapping."""
        tokens, d = hidden_states.shape[0], self.head_dim
        if self.layout == "v2":
            qkv, _ = self.qkv_proj(hidden_states)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q, k = self.rotary_emb(positions, q, k)
            out = self.attn(q, k, v).view(tokens, self.local_heads, 2, d)
            lam = torch.sigmoid(self.lambda_proj(hidden_states)[0]).to(out.dtype)  # (T, H)
            combined = out[:, :, 0] - lam.unsqueeze(-1) * out[:, :, 1]  # (T, H, d)
        else:
            q, _ = self.q_proj(hidden_states)
            k, _ = self.k_proj(hidden_states)
            v, _ = self.v_proj(hidden_states)
            q, k = self.rotary_emb(positions, q, k)  # per d-wide head, before any padding
            if self.layout == "doubled":
                out = self.attn(q, k, torch.cat([v, v], dim=-1)).view(tokens, 2, self.heads, d)
                positive, negative = out[:, 0], out[:, 1]  # (T, H, d)
            else:
                half_q, half_kv = self.heads // 2, self.kv_heads // 2
                q = q.view(tokens, self.heads, d)
                zeros = q.new_zeros(tokens, half_q, d)
                padded = torch.stack([torch.cat([q[:, :half_q], zeros], dim=-1),
                                      torch.cat([zeros, q[:, half_q:]], dim=-1)], dim=2)  # (T, H/2, 2, 2d)
                k, v = k.view(tokens, self.kv_heads, d), v.view(tokens, self.kv_heads, d)
                k = torch.cat([k[:, :half_kv], k[:, half_kv:]], dim=-1)  # (T, G/2, 2d)
                v = torch.cat([v[:, :half_kv], v[:, half_kv:]], dim=-1)
                out = self.attn(padded.reshape(tokens, -1), k.reshape(tokens, -1), v.reshape(tokens, -1))
                out = out.view(tokens, half_q, 2, 2 * d)
                positive, negative = out[:, :, 0], out[:, :, 1]  # (T, H/2, 2d)
            combined = positive - self.lambda_full().to(positive.dtype) * negative
            if self.subln is not None:
                combined = rms_norm(combined, self.subln.weight, self.norm_eps)
        output, _ = self.o_proj(combined.reshape(tokens, -1))
        return output


class NetmorphDiffDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer (norms, MLP, residuals) with netmorph's differential attention."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config,
                         attn_layer_type=NetmorphDiffVllmAttention)


class NetmorphDiffForCausalLM(LlamaForCausalLM):
    """vLLM's LlamaForCausalLM with `NetmorphDiffDecoderLayer`s; loads a netmorph checkpoint's tensors by name.

    Raises ValueError (one line, from `check_servable`) for a family or layout it cannot serve."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        check_servable(vllm_config.model_config.hf_config, get_tensor_model_parallel_world_size())
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=NetmorphDiffDecoderLayer)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy (name, tensor) pairs of the checkpoint into the parameters; returns the names loaded. The stock
        fused projections (gate_up_proj; qkv_proj in V2) take their shards through their own weight loaders."""
        v2 = self.config.diff_layout == "v2"
        stacked = [(".gate_up_proj.", ".gate_proj.", 0), (".gate_up_proj.", ".up_proj.", 1)]
        if v2:
            stacked += [(".qkv_proj.", ".q_proj.", "q"), (".qkv_proj.", ".k_proj.", "k"), (".qkv_proj.", ".v_proj.", "v")]
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (self.config.tie_word_embeddings and name.startswith("lm_head.")):
                continue
            for fused, part, shard in stacked:
                if part in name:
                    name = name.replace(part, fused)
                    param = params[name]
                    param.weight_loader(param, tensor, shard)
                    break
            else:
                if name not in params:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in netmorph's vLLM model: the "
                                     "checkpoint's layout does not match its config.json")
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} tensors netmorph's vLLM model needs, e.g. "
                             f"{sorted(missing)[0]!r}")
        return loaded
