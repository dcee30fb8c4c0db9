"""`qkv-layout`, a surgery of the pipeline: SOURCE → the same model with its q/k/v projections stored in another layout, bit-exact, streamed.

Every layout change is a row permutation (netmorph/ops/qkv_layout.py), so the weights and biases come out with
the same bits in new places. What the output *is* depends on whether a stock transformers class reads it:

- the family's own layout (a checkpoint marked as converted, brought back; or Falcon multi_query `--to
  sequential`, which is the same bytes as its grouped layout): the stock checkpoint, unmarked;
- Llama / Mistral `--to sequential`: a stock **Phi-3** checkpoint (qkv_proj, gate_up_proj, phi3 config) when the
  config fits Phi-3; Phi-3 `--to separate`: a stock **Llama** (or Mistral, with a sliding window) checkpoint when
  it fits Llama. Those are verified on real text with both stock classes;
- anything else (GPT-NeoX `--to sequential`, the legacy-upgrade case; Qwen2 `--to sequential`, …) is a layout no
  stock class reads. It is written only with `--allow-non-stock`: the fused tensor is named after its layout
  (`<attention>.qkv_sequential.weight`, …; separate ones `<attention>.{q,k,v}_proj`), so a stock class never
  mistakes it for its own (it reports missing weights), config.json keeps the model_type and records
  `netmorph_qkv_layout`, and netmorph's other commands refuse it with the command that converts it back.

Verification: the written attention (and MLP) tensors are read back and converted back to the source layout,
which must give the source's bits, and every q/k/v row must sit where the layout's definition puts it; when stock
classes read both the source and the output, both models also run on real text (logits and greedy generation).
"""

import copy
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from netmorph.arch import FAMILIES, ArchSpec, spec_for
from netmorph.arch.layer_view import LayerView
from netmorph.errors import NetmorphError
from netmorph.io.reader import SafetensorsReader, TensorReader
from netmorph.io.streaming import pass_through
from netmorph.ops.qkv_layout import Heads, check_expressible, same_bytes
from netmorph.options import QkvLayoutOptions
from netmorph.pipeline import Card, Surgery, run
from netmorph.sources import Source

log = logging.getLogger("netmorph")

MARKER = "netmorph_qkv_layout"


@dataclass(frozen=True)
class LayoutPlan:
    """One conversion, as data. Tensor names are relative to the layer prefix and lack `.weight` / `.bias`."""

    source_spec: ArchSpec
    target_spec: ArchSpec
    heads: Heads
    num_layers: int
    source_layout: str
    target_layout: str
    source_qkv: tuple[str, ...]
    target_qkv: tuple[str, ...]
    source_mlp: tuple[str, ...] = ()  # gate/up ↔ gate_up when the family changes (Llama ↔ Phi-3)
    target_mlp: tuple[str, ...] = ()
    stock: bool = True  # a stock transformers class reads the output
    source_stock: bool = True  # ... and the source (not one this command wrote in a non-stock layout)
    note: str = ""

    @property
    def transposed(self) -> bool:
        """GPT-2's Conv1D stores weights (in, out): rows are rearranged on the transpose, orientation is kept."""
        return "qkv" in self.source_spec.transposed

    def inverse(self) -> "LayoutPlan":
        """The plan that converts the output back to the source (source and target swapped)."""
        return replace(self, source_spec=self.target_spec, target_spec=self.source_spec,
                       source_layout=self.target_layout, target_layout=self.source_layout,
                       source_qkv=self.target_qkv, target_qkv=self.source_qkv,
                       source_mlp=self.target_mlp, target_mlp=self.source_mlp)

    def layer_names(self, layer_idx: int, source: bool = True) -> list[str]:
        """The full stored names (weight and bias, present or not) of layer `layer_idx`'s q/k/v and converted MLP
        tensors, on the source side or the target side."""
        spec, names = (self.source_spec, self.source_qkv + self.source_mlp) if source else \
            (self.target_spec, self.target_qkv + self.target_mlp)
        prefix = spec.layer_prefix.format(i=layer_idx)
        return [f"{prefix}{name}.{kind}" for name in names for kind in ("weight", "bias")]


# ── which layout a checkpoint holds, under which names ──

def heads_of(spec: ArchSpec, config) -> Heads:
    """The query and key/value head counts of a config (ArchSpec.num_kv_heads for the KV heads)."""
    return Heads(config.num_attention_heads, spec.num_kv_heads(config))


def current_layout(spec: ArchSpec, config) -> str:
    """The layout the checkpoint's q/k/v are stored in: config.json's `netmorph_qkv_layout` (written by this command
    for a non-stock layout), else the family's stock layout."""
    return getattr(config, MARKER, None) or spec.qkv_layout


def is_stock_layout(spec: ArchSpec, layout: str, heads: Heads) -> bool:
    """Whether the family's stock transformers class reads q/k/v stored in `layout` for these head counts (the same
    layout, or fused layouts whose rows coincide: `same_bytes`)."""
    if spec.qkv_layout == "separate" or layout == "separate":
        return layout == spec.qkv_layout
    return same_bytes(layout, spec.qkv_layout, heads)


def qkv_names(spec: ArchSpec, layout: str, heads: Heads) -> tuple[str, ...]:
    """The family's own names for its stock layout; otherwise names that say the layout (`qkv_grouped`), so a stock
    class never reads rows in an order it does not expect."""
    if is_stock_layout(spec, layout, heads):
        return (spec.tensors["qkv"],) if layout != "separate" else tuple(spec.tensors[r] for r in ("q", "k", "v"))
    attention = spec.attention_prefix
    if layout == "separate":
        return tuple(f"{attention}{role}_proj" for role in ("q", "k", "v"))
    return (f"{attention}qkv_{layout}",)


# ── Llama / Mistral ↔ Phi-3: the same model when the configs agree ──

def phi3_misfits(spec: ArchSpec, config, reader: TensorReader) -> list[str]:
    """Why the stock Phi-3 class would not compute this Llama/Mistral model (empty: it would)."""
    reasons = []
    head_dim = spec.head_dim(config)
    if head_dim * config.num_attention_heads != config.hidden_size:
        reasons.append(f"head_dim {head_dim} × {config.num_attention_heads} heads ≠ hidden_size {config.hidden_size}")
    if any(name.endswith(".bias") for name in reader.keys()) or getattr(config, "attention_bias", False) \
            or getattr(config, "mlp_bias", False):
        reasons.append("it has biases")
    if ArchSpec.rope_parameters(config).get("rope_type", "default") != "default":
        reasons.append(f"rope_type {ArchSpec.rope_parameters(config)['rope_type']!r}")
    return reasons


def llama_misfits(config) -> list[str]:
    """Why the stock Llama / Mistral class would not compute this Phi-3 model (empty: it would)."""
    reasons = []
    if ArchSpec.rope_parameters(config).get("partial_rotary_factor", 1.0) != 1.0:
        reasons.append(f"partial_rotary_factor {ArchSpec.rope_parameters(config)['partial_rotary_factor']} (Llama rotates all of head_dim)")
    if ArchSpec.rope_parameters(config).get("rope_type", "default") != "default":
        reasons.append(f"rope_type {ArchSpec.rope_parameters(config)['rope_type']!r}")
    for name in ("resid_pdrop", "embd_pdrop"):
        if getattr(config, name, 0.0):
            reasons.append(f"{name} {getattr(config, name)} (Llama has no such dropout)")
    return reasons


def _shared_config_fields(config) -> dict:
    rope = {"rope_type": "default", "rope_theta": ArchSpec.rope_parameters(config).get("rope_theta", 10000.0)}
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
             "tie_word_embeddings", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id")
    return {**{name: getattr(config, name) for name in names}, "rope_parameters": rope,
            "dtype": getattr(config, "dtype", None)}


def cross_family_config(target_type: str, config):
    """The config of the stock counterpart class (Phi-3 ↔ Llama / Mistral) for the same model."""
    from transformers import LlamaConfig, MistralConfig, Phi3Config

    shared = _shared_config_fields(config)
    if target_type == "phi3":
        return Phi3Config(**shared, original_max_position_embeddings=config.max_position_embeddings,
                          sliding_window=getattr(config, "sliding_window", None))
    head_dim = config.hidden_size // config.num_attention_heads
    if target_type == "mistral":
        return MistralConfig(**shared, head_dim=head_dim, sliding_window=config.sliding_window)
    return LlamaConfig(**shared, head_dim=head_dim, attention_bias=False, mlp_bias=False)


def mlp_names(spec: ArchSpec) -> tuple[str, ...]:
    """Phi-3's fused gate_up_proj, or Llama's gate_proj and up_proj."""
    return tuple(spec.tensors[role] for role in (("gate_up",) if "gate_up" in spec.tensors else ("gate", "up")))


def stock_counterpart(spec: ArchSpec, config, target_layout: str) -> str | None:
    """The other family whose stock class holds this model in `target_layout`: Llama/Mistral ↔ Phi-3."""
    if spec.model_type in ("llama", "mistral") and target_layout == "sequential":
        return "phi3"
    if spec.model_type == "phi3" and target_layout == "separate":
        return "mistral" if getattr(config, "sliding_window", None) else "llama"
    return None


# ── the plan ──

def plan_conversion(source: Source, reader: TensorReader, target_layout: str, allow_non_stock: bool):
    """(LayoutPlan, target config) for converting `source` to `target_layout`, or a one-line refusal."""
    config = source.config
    spec = spec_for(config.model_type, "qkv-layout")
    heads = heads_of(spec, config)
    check_expressible(target_layout, heads)
    source_layout = current_layout(spec, config)
    base = dict(source_spec=spec, target_spec=spec, heads=heads, num_layers=config.num_hidden_layers,
                source_layout=source_layout, target_layout=target_layout,
                source_qkv=qkv_names(spec, source_layout, heads), source_stock=getattr(config, MARKER, None) is None)
    counterpart = stock_counterpart(spec, config, target_layout)
    misfits = []
    if counterpart is not None:
        misfits = phi3_misfits(spec, config, reader) if counterpart == "phi3" else llama_misfits(config)
        if not misfits:
            target_spec = FAMILIES[counterpart]
            plan = LayoutPlan(**{**base, "target_spec": target_spec},
                              target_qkv=qkv_names(target_spec, target_layout, heads),
                              source_mlp=mlp_names(spec), target_mlp=mlp_names(target_spec),
                              note=f"a stock {counterpart} checkpoint (the {spec.model_type} model in the "
                                   f"{target_layout} layout)")
            return plan, cross_family_config(counterpart, config)
    stock = is_stock_layout(spec, target_layout, heads)
    plan = LayoutPlan(**base, target_qkv=qkv_names(spec, target_layout, heads), stock=stock,
                      note=f"the stock {spec.model_type} layout" if stock else
                      f"{target_layout} layout, read by no stock transformers class")
    if not stock and not allow_non_stock:
        why = f" (the stock {counterpart} class cannot hold it: {'; '.join(misfits)})" if misfits else ""
        raise NetmorphError(
            f"no stock transformers class reads a {spec.model_type} model in the {target_layout} layout{why}: pass "
            f"--allow-non-stock to write it anyway (config.json records {MARKER}; `--to {spec.qkv_layout}` converts "
            "it back)"
        )
    target_config = copy.deepcopy(config)
    if stock:
        target_config.__dict__.pop(MARKER, None)
    else:
        setattr(target_config, MARKER, target_layout)
    return plan, target_config


# ── streaming the tensors ──

def layer_views(plan: LayoutPlan) -> tuple[LayerView, LayerView]:
    """The source's and the target's layers, each in its layout under its names."""
    return (LayerView(plan.source_spec, plan.heads, layout=plan.source_layout, qkv_names=plan.source_qkv),
            LayerView(plan.target_spec, plan.heads, layout=plan.target_layout, qkv_names=plan.target_qkv))


def convert_layer(reader: TensorReader, plan: LayoutPlan, layer_idx: int) -> dict[str, torch.Tensor]:
    """One layer's q/k/v (and, across families, its MLP gate/up) read in the source's layout and stored in the
    target's: {full output name: tensor}, the same bits in other places. Raises NetmorphError for an absent q/k/v
    weight or q/k/v biases that are not all present."""
    source, target = layer_views(plan)
    roles = ("q", "k", "v") + (("gate", "up") if plan.source_mlp else ())
    layer, _ = source.read(reader, layer_idx, roles=roles)
    source.require(layer, roles, layer_idx)
    return {name: tensor.contiguous() for name, tensor in target.store(layer, layer_idx).items()}


def convert_tensors(reader: TensorReader, plan: LayoutPlan, writer) -> None:
    """Stream every tensor of the source to `writer`, rearranging each layer's q/k/v on the way (everything else is
    copied file to file). On a `MetaReader` into a `ManifestRecorder` it yields the output manifest."""
    layer_of = {name: i for i in range(plan.num_layers) for name in plan.layer_names(i)}
    done = set()
    for name in reader.keys():
        layer_idx = layer_of.get(name)
        if layer_idx is None:
            pass_through(reader, writer, name)
        elif layer_idx not in done:
            done.add(layer_idx)
            for name_out, tensor in convert_layer(reader, plan, layer_idx).items():
                writer.add(name_out, tensor)
    missing = sorted(set(range(plan.num_layers)) - done)
    if missing:
        raise NetmorphError(f"the checkpoint has no attention weights for layer {missing[0]}: it is incomplete")


def check_round_trip(source_reader: TensorReader, output_dir: Path, plan: LayoutPlan) -> tuple[int, str | None]:
    """Read the written layers back, convert them back, and require the source's bits. Returns (tensors checked,
    the first that does not come back, or None)."""
    written = SafetensorsReader(output_dir)
    inverse = plan.inverse()
    checked = 0
    for layer_idx in range(plan.num_layers):
        for name, tensor in convert_layer(written, inverse, layer_idx).items():
            original = source_reader.get(name)
            if original.dtype != tensor.dtype or not torch.equal(original, tensor):
                return checked, f"{name} does not convert back to its source bits"
            checked += 1
    return checked, None


def row_order(layout: str, heads: Heads, head_dim: int) -> list[tuple[str, int, int]]:
    """(kind, head, row) of every row of a q/k/v projection in `layout`, from the layouts' definitions (the table in
    netmorph/ops/qkv_layout.py), written as plain loops: the independent account `check_row_placement` holds the
    streamed rearrangement to. For "separate" the q, k and v tensors are taken one after the other."""
    H, G, d, r = heads.num_heads, heads.num_kv_heads, head_dim, heads.per_group
    if layout in ("separate", "sequential"):
        return ([("q", h, i) for h in range(H) for i in range(d)] + [("k", g, i) for g in range(G) for i in range(d)]
                + [("v", g, i) for g in range(G) for i in range(d)])
    order = []  # grouped (interleaved is grouped with one query head per group)
    for g in range(G):
        order += [("q", g * r + j, i) for j in range(r) for i in range(d)]
        order += [("k", g, i) for i in range(d)] + [("v", g, i) for i in range(d)]
    return order


def check_row_placement(source_reader: TensorReader, output_dir: Path, plan: LayoutPlan) -> str | None:
    """Every q/k/v row of the output sits where the target layout's definition puts the source row of that kind,
    head and index (`row_order` of both layouts), bit for bit. Returns the first misplaced row, or None.
    Independent of the conversion code: a permutation that is wrong the same way in both directions passes the
    round trip but not this."""
    written = SafetensorsReader(output_dir)
    for layer_idx in range(plan.num_layers):
        for kind in ("weight", "bias"):
            source = _stacked_rows(source_reader, plan, layer_idx, kind, source_side=True)
            output = _stacked_rows(written, plan, layer_idx, kind, source_side=False)
            if source is None and output is None:
                continue
            if source is None or output is None or source.shape != output.shape:
                return f"layer {layer_idx}: the q/k/v {kind}s of the output do not match the source's in shape"
            d = source.shape[0] // (plan.heads.num_heads + 2 * plan.heads.num_kv_heads)
            position = {row: n for n, row in enumerate(row_order(plan.source_layout, plan.heads, d))}
            target = row_order(plan.target_layout, plan.heads, d)
            expected = source[torch.tensor([position[row] for row in target])]
            if not torch.equal(expected, output):
                n = next(n for n in range(len(target)) if not torch.equal(expected[n], output[n]))
                kind_of, head, index = target[n]
                return (f"layer {layer_idx} {kind} row {n} does not hold {kind_of} head {head} row {index} of the "
                        f"source, where the {plan.target_layout} layout puts it")
    return None


def _stacked_rows(reader: TensorReader, plan: LayoutPlan, layer_idx: int, kind: str, source_side: bool):
    """One layer's q/k/v rows as one tensor (separate q, k, v concatenated; a Conv1D weight transposed to rows)."""
    spec, names = (plan.source_spec, plan.source_qkv) if source_side else (plan.target_spec, plan.target_qkv)
    prefix = spec.layer_prefix.format(i=layer_idx)
    present = [f"{prefix}{name}.{kind}" for name in names if f"{prefix}{name}.{kind}" in reader]
    if not present:
        return None
    tensors = [reader.get(name) for name in present]
    if kind == "weight" and "qkv" in spec.transposed:
        tensors = [tensor.T for tensor in tensors]
    return torch.cat(tensors, dim=0)


# ── verification, model card, the command ──

class QkvLayoutSurgery(Surgery):
    """The same model with its q/k/v projections in another layout (see the module docstring)."""

    command = "qkv-layout"
    verb = "rearranging"
    tags = ("qkv-layout",)
    reads_any_qkv_layout = True

    def __init__(self, source, options: QkvLayoutOptions):
        super().__init__(source, options)
        self.plan, self.config = plan_conversion(source, source.reader(), options.to, options.allow_non_stock)
        self.source_backend = self.plan.source_spec.attention_backend
        self.output_backend = self.plan.target_spec.attention_backend
        self.round_trip_tensors = 0

    def stream(self, reader: TensorReader, writer) -> None:
        """Every tensor to `writer`, each layer's q/k/v rearranged by `convert_tensors`."""
        convert_tensors(reader, self.plan, writer)

    def bit_checks(self, reader: TensorReader, directory: Path) -> list[str]:
        """Converting the written tensors back gives the source's bits, and every q/k/v row sits where the target
        layout's definition puts it (`check_row_placement`, independent of the conversion code)."""
        self.round_trip_tensors, problem = check_round_trip(reader, directory, self.plan)
        problems = [p for p in (problem, check_row_placement(reader, directory, self.plan)) if p]
        if not problems:
            log.info("round trip: %d written tensors convert back to the source's bits; every q/k/v row sits where "
                     "the %s layout puts it", self.round_trip_tensors, self.plan.target_layout)
        return problems

    @property
    def verifiable(self) -> bool:
        """Whether both models can run: the source and the target layout must each be one that a stock class reads."""
        return self.plan.stock and self.plan.source_stock

    def card(self) -> Card:
        """The relayout's card: the source layout and heads, the output names, a warning for a non-stock layout, and
        the bit-level checks that passed."""
        plan, heads = self.plan, self.plan.heads
        lines = [
            "- A row permutation: every weight and bias keeps its exact bits.",
            f"- Source layout: {plan.source_layout}; heads: {heads.num_heads} query, {heads.num_kv_heads} key/value "
            f"({heads.kind})",
            f"- Output: {plan.note}; q/k/v tensors `{', '.join(plan.target_qkv)}` in every layer",
        ]
        if not plan.stock:
            lines.append(f"- **No stock transformers class reads this layout.** config.json records `{MARKER}: "
                         f"\"{plan.target_layout}\"`; convert it back with `netmorph qkv-layout <this dir> --to "
                         f"{plan.source_spec.qkv_layout} -o DIR`.")
        if self.round_trip_tensors:
            lines.append(f"- Checked: {self.round_trip_tensors} written tensors read back and converted back give the "
                         f"source's bits; every q/k/v row sits where the {plan.target_layout} layout's definition puts "
                         "it.")
        return Card(f"`{self.source.description}` with q/k/v in the {plan.target_layout} layout", lines)

    def summary(self) -> str:
        """The plan's note: which stock class (or none) reads the output layout."""
        return self.plan.note


def convert_qkv_layout(source_arg: str | None, output_dir: str | Path | None, options: QkvLayoutOptions):
    """SOURCE → the same model with q/k/v in `options.to`, verified. Returns the pipeline's Result (its `plan` is the
    LayoutPlan); raises NetmorphError on bad input, VerificationFailed when a check fails."""
    return run(QkvLayoutSurgery, source_arg, output_dir, options)
