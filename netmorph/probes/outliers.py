"""Activation outliers per decoder layer: the residual stream and the attention output.

Statistics (over all tokens of the probe text, fp32):
- `max_over_median`: max |x| / median |x| over every token and channel — the paper's activation-outlier measure
  (Ye et al. 2024, arXiv 2410.05258, section "Activation Outliers Analysis": top activation values against the median).
- `kurtosis`: excess kurtosis of each token's vector of channels (mean((x−μ)⁴)/σ⁴ − 3, so a Gaussian gives 0),
  averaged over tokens — the outlier measure of Bondarenko et al. 2023, "Quantizable Transformers" (arXiv
  2306.12929, §5, which reports it with scipy.stats.kurtosis's Fisher definition, the same as here).
- `top_channels`: the channels with the largest max |x| over tokens (outlier *features*, as in Dettmers et al. 2022,
  "LLM.int8()", arXiv 2208.07339), each with that value.
"""

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class SiteStats:
    """One layer's statistics at one site (residual stream or attention output)."""

    max_abs: float
    median_abs: float
    max_over_median: float
    kurtosis: float
    top_channels: list[dict] = field(default_factory=list)  # [{"channel": int, "max_abs": float}], largest first


@dataclass
class LayerOutliers:
    """The outlier statistics of one decoder layer `layer` (0-based): its output on the residual stream and its
    attention output (after o_proj)."""
    layer: int
    residual: SiteStats
    attention: SiteStats


def excess_kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Excess kurtosis of each row of x (…, D) over its last dim: mean((x−μ)⁴) / mean((x−μ)²)² − 3 (0 for a
    Gaussian, −1.2 for a uniform distribution); fp64 math, returns (…,) float64. Rows with zero variance give NaN."""
    x = x.double()
    centered = x - x.mean(-1, keepdim=True)
    variance = centered.pow(2).mean(-1)
    return centered.pow(4).mean(-1) / variance.pow(2) - 3.0


def median(values: torch.Tensor) -> float:
    """The median of a 1-D tensor, the mean of the two middle values for an even count (numpy's definition;
    torch.median returns the lower one)."""
    n = values.numel()
    lower = values.kthvalue((n + 1) // 2).values
    return lower.item() if n % 2 else (lower.double() + values.kthvalue(n // 2 + 1).values.double()).item() / 2


def site_stats(x: torch.Tensor, top_k: int = 5) -> SiteStats:
    """Statistics of activations x (…, D): all leading dims are tokens, the last is channels."""
    flat = x.detach().reshape(-1, x.shape[-1]).float()
    magnitude = flat.abs()
    max_abs = magnitude.max().item()
    median_abs = median(magnitude.flatten())
    per_channel = magnitude.amax(0)
    values, channels = per_channel.topk(min(top_k, per_channel.numel()))
    return SiteStats(
        max_abs=max_abs, median_abs=median_abs,
        max_over_median=max_abs / median_abs if median_abs > 0 else float("inf"),
        kurtosis=excess_kurtosis(flat).nanmean().item(),
        top_channels=[{"channel": int(c), "max_abs": float(v)} for v, c in zip(values, channels)],
    )


ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of any causal LM netmorph loads (stock, converted, grown): the ModuleList holding
    `num_hidden_layers` modules that each have an attention child. Raises ValueError when there is none."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and all(
            any(hasattr(layer, name) for name in ATTENTION_NAMES) for layer in module
        ):
            return module
    raise ValueError(f"{type(model).__name__} has no list of {count} decoder layers with an attention module")


def attention_module(layer: nn.Module) -> nn.Module:
    """The attention module of one decoder layer (self_attn, attention, attn or self_attention)."""
    for name in ATTENTION_NAMES:
        if isinstance(getattr(layer, name, None), nn.Module):
            return getattr(layer, name)
    raise ValueError(f"{type(layer).__name__} has no attention module ({', '.join(ATTENTION_NAMES)})")


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def activation_outliers(model: nn.Module, blocks: torch.Tensor, top_k: int = 5) -> list[LayerOutliers]:
    """Per decoder layer, statistics of the residual stream (the layer's output hidden states) and of the attention
    output (the attention module's output after its out projection, before the residual add) on `blocks`
    (N, T) int64 token ids, run in one batch without cache."""
    layers = decoder_layers(model)
    captured: dict[tuple[int, str], SiteStats] = {}
    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(
            lambda module, args, output, i=index: captured.__setitem__((i, "residual"), site_stats(_first(output), top_k))))
        handles.append(attention_module(layer).register_forward_hook(
            lambda module, args, output, i=index: captured.__setitem__((i, "attention"), site_stats(_first(output), top_k))))
    try:
        model.eval()
        model(blocks, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [LayerOutliers(i, captured[i, "residual"], captured[i, "attention"]) for i in range(len(layers))]
