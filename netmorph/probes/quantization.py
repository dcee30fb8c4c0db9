"""Quantization robustness: how much the loss on held-out text rises when the weights or the activations lose bits.

- Weight-only, with torchao (https://github.com/pytorch/ao), on every nn.Linear inside the decoder layers (embeddings
  and lm_head stay fp32, so tied and untied models are treated alike):
  `int8`: `Int8WeightOnlyConfig` — per output channel, symmetric, scale = max|w| / 127.5, q = clamp(round(w/s),
  −128, 127) (torchao's choose_qparams_affine); `int4`: `IntxWeightOnlyConfig(weight_dtype=torch.int4,
  granularity=PerGroup(32))` — groups of 32 input channels, symmetric, scale = max|w| / 7.5, q ∈ [−8, 7]. torchao's
  `Int4WeightOnlyConfig` has no CPU kernel in torchao 0.18 (it needs CUDA or the `mslk` package), so the int4 row uses
  the Intx path, which dequantizes and multiplies on any device. Linears whose input width is not a multiple of the
  group size are left in fp32 for int4 and counted (`skipped`).
- Activations, fake-quantized (quantize then dequantize, in the forward): the input of every nn.Linear inside the
  decoder layers, per token, symmetric absmax to b bits: s = max|x| / (2^(b−1) − 1), x̂ = clamp(round(x/s),
  −(2^(b−1) − 1), 2^(b−1) − 1)·s — the per-token activation quantization of LLM.int8() (Dettmers et al. 2022,
  arXiv 2208.07339) and SmoothQuant (Xiao et al. 2023, arXiv 2211.10438). One large outlier channel makes s large
  and rounds every other channel of that token to few levels, which is what the differential-attention paper's claim
  about outliers (arXiv 2410.05258, "Activation Outliers Analysis") predicts this measures.
"""

import copy
from dataclasses import dataclass

import torch
from torch import nn

from netmorph.probes.outliers import decoder_layers

INT4_GROUP_SIZE = 32


@dataclass
class QuantizationRow:
    """One quantization setting's loss (nats per token) on the probe blocks, its change from the unquantized loss,
    and how many nn.Linear layers were quantized or skipped."""
    name: str  # "weights int8", "activations 4-bit", ...
    loss: float
    loss_delta: float  # loss − the unquantized loss (nats per token)
    quantized_linears: int
    skipped_linears: int = 0
    # Share of the decoder layers' weight elements (parameters with ≥ 2 dims) that the row quantized: below 1 when
    # linears are skipped or weights live outside nn.Linear (MoE experts stored as one 3-D tensor per layer).
    quantized_fraction: float = 1.0


@dataclass
class QuantizationResult:
    """The unquantized loss (nats per token) over `tokens` predicted tokens, and one QuantizationRow per setting."""
    loss: float  # the unquantized model's loss on the blocks
    tokens: int
    rows: list[QuantizationRow]


def fake_quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-token (last dim) absmax fake quantization to `bits` (2..16) bits; same shape and dtype as x.
    Rows of zeros stay zero."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be 2..16, not {bits}")
    levels = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True).float() / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.clamp(torch.round(x.float() / scale), -levels, levels) * scale).to(x.dtype)


def layer_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every nn.Linear inside the decoder layers."""
    layers = decoder_layers(model)
    return [(f"{i}.{name}", module) for i, layer in enumerate(layers)
            for name, module in layer.named_modules() if isinstance(module, nn.Linear)]


def quantized_fraction(model: nn.Module, linears: list[nn.Linear]) -> float:
    """Elements of the weights of `linears` over all weight elements (parameters with ≥ 2 dims) in the decoder
    layers of `model`: 1.0 when every weight of the layers is in one of them. MoE experts stored as 3-D tensors
    (Mixtral, Qwen3-MoE, GPT-OSS in transformers 5) are not nn.Linear and count against it."""
    total = sum(p.numel() for layer in decoder_layers(model) for p in layer.parameters() if p.dim() >= 2)
    return sum(linear.weight.numel() for linear in linears) / total if total else 0.0


@torch.no_grad()
def block_loss(model: nn.Module, blocks: torch.Tensor) -> tuple[float, int]:
    """Token-weighted mean next-token cross-entropy (nats) of `model` on (N, T) blocks, and the tokens predicted."""
    total, count = 0.0, 0
    for block in blocks:
        logits = model(block[None], use_cache=False).logits[0].float()
        total += nn.functional.cross_entropy(logits[:-1], block[1:], reduction="sum").item()
        count += block.numel() - 1
    return total / count, count


def _torchao():
    try:
        import torchao.quantization as quantization
        from torchao.quantization.granularity import PerGroup
    except ImportError:
        raise ValueError("the weight quantization probe needs torchao: pip install 'netmorph[probes]'") from None
    return quantization, PerGroup


def weight_quantized_copy(model: nn.Module, kind: str) -> tuple[nn.Module, int, int, float]:
    """A deep copy of `model` with the decoder layers' linears quantized by torchao (`kind` "int8" or "int4", see
    the module docstring); returns (copy, quantized linears, skipped linears, quantized_fraction of the weights).
    Raises ValueError for another `kind`, or without torchao."""
    quantization, PerGroup = _torchao()
    if kind == "int8":
        config, fits = quantization.Int8WeightOnlyConfig(), lambda linear: True
    elif kind == "int4":
        config = quantization.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP_SIZE))
        fits = lambda linear: linear.in_features % INT4_GROUP_SIZE == 0  # noqa: E731
    else:
        raise ValueError(f"unknown weight quantization {kind!r}: int8 or int4")
    quantized = copy.deepcopy(model)
    linears = [module for _, module in layer_linears(quantized)]
    chosen = [module for module in linears if fits(module)]
    fraction = quantized_fraction(quantized, chosen)
    ids = {id(module) for module in chosen}
    quantization.quantize_(quantized, config, filter_fn=lambda module, fqn: id(module) in ids)
    return quantized, len(chosen), len(linears) - len(chosen), fraction


class activation_fake_quantization:
    """Context manager: while active, the input of every linear inside the decoder layers of `model` is passed
    through `fake_quantize_per_token(x, bits)`."""

    def __init__(self, model: nn.Module, bits: int):
        self.linears = [module for _, module in layer_linears(model)]
        self.bits = bits
        self.handles = []

    def __enter__(self):
        bits = self.bits
        for linear in self.linears:
            self.handles.append(linear.register_forward_pre_hook(
                lambda module, args: (fake_quantize_per_token(args[0], bits), *args[1:])))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def quantization_probe(model: nn.Module, blocks: torch.Tensor, weight_kinds=("int8", "int4"),
                       activation_bits=(8, 6, 4)) -> QuantizationResult:
    """The loss of `model` on `blocks` (N, T) and its change under each weight-only quantization (torchao) and each
    activation fake quantization; the model itself is left unchanged."""
    model.eval()
    base, tokens = block_loss(model, blocks)
    rows = []
    for kind in weight_kinds:
        quantized, count, skipped, fraction = weight_quantized_copy(model, kind)
        loss, _ = block_loss(quantized, blocks)
        del quantized
        rows.append(QuantizationRow(f"weights {kind}", loss, loss - base, count, skipped, fraction))
    for bits in activation_bits:
        with activation_fake_quantization(model, bits) as context:
            loss, _ = block_loss(model, blocks)
        rows.append(QuantizationRow(f"activations {bits}-bit", loss, loss - base, len(context.linears),
                                    quantized_fraction=quantized_fraction(model, context.linears)))
    return QuantizationResult(base, tokens, rows)
