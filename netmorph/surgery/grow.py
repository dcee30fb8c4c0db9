"""`grow`, a surgery of the pipeline: SOURCE → a larger checkpoint of the *same stock architecture* that computes the
same function.

Every constraint is checked before any tensor is read (`plan_growth`, then the target config class itself);
then the whole growth runs once on meta tensors (no data) to plan the output, and tensors stream layer by layer
from the reader through the pure recipes in netmorph/ops/grow.py to the streaming writer (one layer in memory,
unchanged tensors copied file to file) inside an atomic output dir; finally the grown model is loaded fresh from disk with the stock
transformers class and compared with the source on real text.
"""

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from netmorph.arch import ArchSpec, spec_for
from netmorph.arch.families import FUSED_EXPERTS, GROW_DIMS
from netmorph.arch.layer_view import LayerView
from netmorph.errors import NetmorphError
from netmorph.io.reader import MetaReader, TensorReader
from netmorph.io.streaming import CastingWriter, pass_through
from netmorph.ops import grow as ops
from netmorph.ops.qkv_layout import Heads
from netmorph.options import GrowOptions
from netmorph.pipeline import Card, Surgery, run
from netmorph.verify.compare import own_rounding

log = logging.getLogger("netmorph")

FULL_ROTARY_ROPE_TYPES = ("default", "linear", "llama3")  # act per frequency: θ′ = θ^(d′/d) keeps every frequency


@dataclass(frozen=True)
class Dims:
    """The growable sizes of a model (`GROW_DIMS`): layers, MLP intermediate size, query heads, key/value heads,
    head_dim and hidden size, all counts."""

    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int


@dataclass
class GrowthPlan:
    """Everything decided before the first tensor is read."""

    spec: ArchSpec
    source: Dims
    target: Dims
    layer_sources: list[tuple[int, bool]]  # per output layer: (source layer, is it new)
    rotary_dims: int
    config_updates: dict = field(default_factory=dict)
    q_scales: list[float] = field(default_factory=list)  # per output layer, where the score scale depends on it

    @property
    def rescales(self) -> bool:
        """Does a recipe multiply existing weights by a factor (norm gains × √(n/n′), q × √(d′/d), W/k for copies,
        GPT-2's layer-index q scale)? In a bf16/fp16 checkpoint the products are rounded to it."""
        s, t = self.source, self.target
        return s.hidden != t.hidden or s.head_dim != t.head_dim or any(scale != 1.0 for scale in self.q_scales)

    @property
    def attention_changes(self) -> bool:
        """Whether heads, KV heads, head_dim or the hidden size change (the attention tensors reshape)."""
        s, t = self.source, self.target
        return (s.heads, s.kv_heads, s.head_dim, s.hidden) != (t.heads, t.kv_heads, t.head_dim, t.hidden)


# ── planning: every check before any work ───────────────────────────────────────────────────────────────────────


def source_dims(config, spec: ArchSpec) -> Dims:
    """The sizes of a source config, read through the family's field names (GPT-2's n_inner None → 4 × hidden)."""
    heads, hidden = config.num_attention_heads, config.hidden_size
    return Dims(
        layers=config.num_hidden_layers,
        # GPT-2's n_inner may be None: the model then uses 4 × hidden
        intermediate=getattr(config, spec.field("intermediate_size"), None) or 4 * hidden,
        heads=heads,
        kv_heads=spec.num_kv_heads(config),
        head_dim=spec.head_dim(config),
        hidden=hidden,
    )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _valid_head_counts(dims: Dims, hidden: int, kv_heads: int, count: int = 4) -> list[int]:
    """Query-head counts ≥ the current ones that divide `hidden`, hold the KV heads and keep old heads placeable."""
    found = []
    for heads in range(dims.heads, hidden + 1):
        if hidden % heads or heads % kv_heads:
            continue
        try:
            ops.head_placement(dims.heads, dims.kv_heads, heads, kv_heads)
        except NetmorphError:
            continue
        found.append(heads)
        if len(found) == count:
            break
    return found


def _check_not_shrinking(source: Dims, options: GrowOptions) -> None:
    for name, current in (("num_layers", source.layers), ("intermediate_size", source.intermediate),
                          ("num_attention_heads", source.heads), ("num_key_value_heads", source.kv_heads),
                          ("head_dim", source.head_dim), ("hidden_size", source.hidden)):
        value = getattr(options, name)
        if value is not None and value < current:
            raise NetmorphError(f"{_flag(name)} {value} is smaller than the model's {current}: grow only "
                                f"(pass a value ≥ {current}, or leave it out)")


def _target_dims(source: Dims, spec: ArchSpec, config, options: GrowOptions) -> Dims:
    heads = options.num_attention_heads or source.heads
    kv_heads = options.num_key_value_heads or source.kv_heads
    rule = spec.kv_heads_rule(config)
    if rule == "heads":  # GPT-NeoX, GPT-2, Falcon multi_query=False: one KV head per query head, always
        if options.num_key_value_heads not in (None, heads):
            raise NetmorphError(f"{spec.model_type} has one KV head per query head: set "
                                f"{_flag('num_key_value_heads')} equal to the query heads ({heads}) or leave it out")
        kv_heads = heads
    if rule == "one" and options.num_key_value_heads not in (None, 1):
        raise NetmorphError(f"this {spec.model_type} model is multi-query (one KV head, config multi_query): leave "
                            f"{_flag('num_key_value_heads')} out")
    if heads % kv_heads:
        divisors = [k for k in range(kv_heads, heads + 1) if heads % k == 0]
        raise NetmorphError(f"{heads} query heads cannot be split into {kv_heads} KV heads: pick "
                            f"{_flag('num_key_value_heads')} from {divisors} or heads a multiple of {kv_heads}")
    hidden = options.hidden_size or source.hidden
    head_dim = options.head_dim or source.head_dim
    if not spec.free_head_dim:
        if options.head_dim is None and options.hidden_size is not None:
            if hidden % heads:
                proposals = _valid_head_counts(source, hidden, kv_heads) or [heads]
                raise NetmorphError(
                    f"{spec.model_type} derives head_dim = hidden / heads, and {hidden} / {heads} is not whole: pass "
                    f"{_flag('num_attention_heads')} one of {proposals}, or {_flag('hidden_size')} a multiple of "
                    f"{heads} (e.g. {heads * (hidden // heads + 1)})"
                )
            head_dim = hidden // heads
        if heads * head_dim != hidden:
            raise NetmorphError(
                f"{spec.model_type} derives head_dim = hidden / heads: {heads} heads × head_dim {head_dim} needs "
                f"{_flag('hidden_size')} {heads * head_dim} (got {hidden}), or choose heads/head_dim whose product is "
                f"{hidden}"
            )
    if spec.heads_divide_hidden and hidden % heads:
        proposals = _valid_head_counts(source, hidden, kv_heads)
        raise NetmorphError(
            f"transformers' {spec.model_type} config rejects hidden {hidden} with {heads} heads (hidden % heads ≠ 0): "
            + (f"pass {_flag('num_attention_heads')} one of {proposals} or " if proposals else "")
            + f"{_flag('hidden_size')} a multiple of {heads} (e.g. {heads * math.ceil(hidden / heads)})"
        )
    return Dims(options.num_layers or source.layers, options.intermediate_size or source.intermediate, heads,
                kv_heads, head_dim, hidden)


def new_layer_positions(num_source: int, num_new: int, where: str) -> list[int]:
    """Source layer index each new layer follows: append → all after the last; interleave → spread evenly."""
    if num_new == 0:
        return []
    if where == "append":
        return [num_source - 1] * num_new
    if where == "interleave":
        return [max(0, (j + 1) * num_source // (num_new + 1) - 1) for j in range(num_new)]
    positions = [int(p) for p in where.split(",")]
    if len(positions) != num_new:
        raise NetmorphError(f"--new-layers-at lists {len(positions)} positions but {num_new} layers are new: "
                            f"give exactly {num_new} source layer indices")
    bad = [p for p in positions if p >= num_source]
    if bad:
        raise NetmorphError(f"--new-layers-at {bad[0]} is not a source layer (0…{num_source - 1})")
    return positions


def layer_order(num_source: int, positions: list[int]) -> list[tuple[int, bool]]:
    """Per output layer, (source layer index, is it new): every source layer in order, each followed by as many new
    layers as `positions` lists it."""
    order = []
    for i in range(num_source):
        order.append((i, False))
        order += [(i, True)] * positions.count(i)
    return order


def _rope_updates(config, spec: ArchSpec, source: Dims, target: Dims) -> tuple[int, dict]:
    """(rotary dims per head, config updates) for head_dim growth; learned positions rotate nothing."""
    if spec.rope_kind(config) in ("none", "alibi"):
        return 0, {}
    rope = spec.rope_parameters(config)
    prf = rope.get("partial_rotary_factor", 1.0) or 1.0
    rotary_dims = int(source.head_dim * prf)
    if target.head_dim == source.head_dim:
        return rotary_dims, {}
    d, d2 = source.head_dim, target.head_dim
    if rotary_dims < d:  # partial: pad the pass-through region; (r + ½)/d′ so int(d′·prf′) is exactly r
        rope["partial_rotary_factor"] = (rotary_dims + 0.5) / d2
        return rotary_dims, {"rope_parameters": rope}
    if d2 % 2:
        raise NetmorphError(f"{_flag('head_dim')} {d2} is odd; RoPE rotates pairs: pass an even head_dim (e.g. {d2 + 1})")
    rope_type = rope.get("rope_type", "default")
    if rope_type not in FULL_ROTARY_ROPE_TYPES:
        raise NetmorphError(f"head_dim growth with rope_type {rope_type!r} is not supported (its frequencies depend "
                            f"on head_dim); supported: {', '.join(FULL_ROTARY_ROPE_TYPES)}; grow heads instead")
    if d2 % d:
        rope["rope_theta"] = rope["rope_theta"] ** (d2 / d)  # θ′^(−2i/d′) = θ^(−2i/d): every frequency kept
    return rotary_dims, {"rope_parameters": rope}


def _check_refusals(spec: ArchSpec, config, source: Dims, options: GrowOptions) -> None:
    """The family's own limits (ArchSpec.grow_refuses), checked on the flags as given (before sizes that depend on
    them are derived): a one-line reason and the dims that do grow exactly."""
    changed = {dim for dim, current in zip(GROW_DIMS, asdict(source).values())
               if getattr(options, dim) not in (None, current)}
    refusals = spec.refusals(config)
    refused = {dim for r in refusals for dim in r.dims}
    for refusal in refusals:
        hit = [dim for dim in GROW_DIMS if dim in changed and dim in refusal.dims]
        if hit:
            allowed = [_flag(dim) for dim in GROW_DIMS if dim not in refused]
            raise NetmorphError(
                f"this {spec.model_type} model cannot grow {', '.join(_flag(d) for d in hit)} exactly: "
                f"{refusal.reason}; grow {', '.join(allowed[:-1])} or {allowed[-1]} only"
            )


def _layer_index_q_scales(spec: ArchSpec, config, order: list[tuple[int, bool]]) -> list[float]:
    """GPT-2 with scale_attn_by_inverse_layer_idx divides layer j's scores by j + 1: a layer that moves from index i
    to j gets q × (j+1)/(i+1), so its scores stay (new layers copy their source's scale the same way)."""
    if not (spec.layer_index_scaling_field and getattr(config, spec.layer_index_scaling_field, False)):
        return []
    return [(out_idx + 1) / (source_idx + 1) for out_idx, (source_idx, _) in enumerate(order)]


def plan_growth(config, spec: ArchSpec, options: GrowOptions) -> GrowthPlan:
    """Every check and decision of a growth from the source config alone, before any tensor is read: target sizes,
    layer order, RoPE and eps updates, per-layer q scales. Raises NetmorphError for a shrinking or impossible size, a
    family refusal (ArchSpec.grow_refuses), a head layout that cannot hold the old heads, an odd or unsupported
    head_dim growth under RoPE, --new-layers-at positions that do not fit, or a hidden size that is not a whole
    multiple where the family grows by copies. Recipes: Llama Pro (arXiv:2401.02415) for depth; Net2Net
    (arXiv:1511.05641) and bert2BERT (arXiv:2110.07143) for width."""
    source = source_dims(config, spec)
    _check_not_shrinking(source, options)
    _check_refusals(spec, config, source, options)
    target = _target_dims(source, spec, config, options)
    if spec.qk_norm == "full_width" and target.kv_heads % source.kv_heads:
        raise NetmorphError(
            f"{spec.model_type}'s k norm normalises over all KV heads × head_dim together: new KV heads must be "
            f"copies of the old ones to keep it exact, so pass {_flag('num_key_value_heads')} a multiple of "
            f"{source.kv_heads} (e.g. {2 * source.kv_heads})"
        )
    ops.head_placement(source.heads, source.kv_heads, target.heads, target.kv_heads)  # raises if impossible
    rotary_dims, updates = _rope_updates(config, spec, source, target)
    positions = new_layer_positions(source.layers, target.layers - source.layers, options.new_layers_at)
    order = layer_order(source.layers, positions)
    if target.hidden != source.hidden and spec.hidden_growth == "copies":
        if target.hidden % source.hidden:
            raise NetmorphError(
                f"{spec.model_type} grows hidden_size by whole copies of the residual stream (its q/k norms share "
                f"{spec.eps_field} with every norm, so zero-fill's eps × n/n′ would not be exact): pass "
                f"{_flag('hidden_size')} a multiple of {source.hidden} (e.g. {2 * source.hidden})"
            )
    elif target.hidden != source.hidden:
        updates[spec.eps_field] = getattr(config, spec.eps_field) * source.hidden / target.hidden
    updates.update({spec.field("num_layers"): target.layers, spec.field("intermediate_size"): target.intermediate,
                    spec.field("num_attention_heads"): target.heads, spec.field("hidden_size"): target.hidden})
    if spec.kv_heads_rule(config) != "one" and spec.kv_heads != "heads":
        updates[spec.field("num_key_value_heads")] = target.kv_heads
    if spec.free_head_dim:
        updates["head_dim"] = target.head_dim
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        updates["layer_types"] = [layer_types[i] for i, _ in order]
    if spec.no_rope_field and getattr(config, spec.no_rope_field, None):  # SmolLM3: NoPE layers stay NoPE
        updates[spec.no_rope_field] = [getattr(config, spec.no_rope_field)[i] for i, _ in order]
    if spec.dense_mlp_layers:  # Qwen3-MoE: every output layer keeps its source layer's MLP kind, listed by index
        dense = set(spec.dense_layers(config))
        updates[spec.dense_mlp_layers[0]] = [out for out, (i, _) in enumerate(order) if i in dense]
        updates[spec.dense_mlp_layers[1]] = 1
    return GrowthPlan(spec, source, target, order, rotary_dims, updates, _layer_index_q_scales(spec, config, order))


def target_config(source_config, plan: GrowthPlan):
    """The grown model's config, built by the stock config class (its strict validation runs here, before work)."""
    data = source_config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        data.pop(key, None)
    data.update(plan.config_updates)
    try:
        return type(source_config).from_dict(data)
    except (ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NetmorphError(f"transformers rejects the grown {source_config.model_type} config: {first}; "
                            "choose other sizes") from None


# ── tensors: read a layer into canonical form, grow it, write it back ───────────────────────────────────────────


def _layer_keys(reader: TensorReader, spec: ArchSpec) -> dict[int, list[str]]:
    pattern = re.compile(re.escape(spec.layer_prefix).replace(re.escape("{i}"), r"(\d+)"))
    layers: dict[int, list[str]] = {}
    for name in reader.keys():
        match = pattern.match(name)
        if match:
            layers.setdefault(int(match.group(1)), []).append(name)
    return layers


def layer_view(spec: ArchSpec, dims: Dims) -> LayerView:
    """The family's stored layers with the head counts and head_dim of `dims` (the source's or the target's)."""
    return LayerView(spec, Heads(dims.heads, dims.kv_heads), dims.head_dim)


def read_layer(reader: TensorReader, spec: ArchSpec, layer_idx: int, names: list[str], dims: Dims):
    """Canonical float64 tensors of one layer (fused layouts split, Conv1D transposed; netmorph/arch/layer_view.py),
    plus the tensors of no known role (mixture-of-experts blocks, GPT-OSS sinks) by their name under the layer
    prefix. Raises NetmorphError for an absent weight or a shape config.json does not imply."""
    view = layer_view(spec, dims)
    layer, extras = view.read(reader, layer_idx, dtype=ops.DTYPE, names=names)
    moe = any(is_moe_tensor(spec, name) for name in extras)  # a mixture-of-experts layer has no dense MLP
    view.require(layer, ("q", "k", "v", "o") + (() if moe else ("up", "down")), layer_idx)
    expected = {"q.weight": (dims.heads * dims.head_dim, dims.hidden),
                "k.weight": (dims.kv_heads * dims.head_dim, dims.hidden),
                "o.weight": (dims.hidden, dims.heads * dims.head_dim)}
    if not moe:
        expected.update({"up.weight": (dims.intermediate, dims.hidden), "down.weight": (dims.hidden, dims.intermediate)})
    view.check_shapes(layer, expected, layer_idx)
    return layer, extras


def is_moe_tensor(spec: ArchSpec, suffix: str) -> bool:
    """Is the layer tensor (name under the layer prefix) part of a mixture-of-experts block (router, experts)?"""
    return any(re.fullmatch(pattern, suffix) for pattern in spec.moe_tensors)


def grow_extras(extras: dict, plan: GrowthPlan, is_new: bool) -> dict:
    """The layer tensors that are not roles: mixture-of-experts blocks pass through, except that a new layer's
    experts write nothing (their down projections and biases zero: the routed sum is then zero whatever the router
    picks); GPT-OSS's per-head sinks (one logit per query head, shape (H,)) follow their heads."""
    spec, s, t = plan.spec, plan.source, plan.target
    grown = {}
    for suffix, tensor in extras.items():
        if is_new and any(re.fullmatch(pattern, suffix) for pattern in spec.moe_writers):
            tensor = torch.zeros_like(tensor)
        elif spec.sinks and suffix == spec.attention_prefix + spec.sinks and (s.heads, s.kv_heads) != (t.heads,
                                                                                                       t.kv_heads):
            tensor = ops.place_head_values(tensor, s.heads, s.kv_heads, t.heads, t.kv_heads)
        grown[suffix] = tensor
    return grown


def write_layer(layer: dict, extras: dict, spec: ArchSpec, layer_idx: int, dims: Dims, dtype, writer) -> None:
    """One grown layer to the writer in `dtype`, stored as the family stores it (the inverse of `read_layer`)."""
    # Copies, never views: a new layer may share tensors with its source, and safetensors refuses shared memory.
    for name, tensor in layer_view(spec, dims).store(layer, layer_idx).items():
        writer.add(name, tensor.to(dtype, copy=True).contiguous())
    prefix = spec.layer_prefix.format(i=layer_idx)
    for suffix, tensor in extras.items():
        writer.add(prefix + suffix, tensor.clone())


def grow_layer(layer: dict, plan: GrowthPlan, is_new: bool, options: GrowOptions, generator,
               out_idx: int | None = None) -> dict:
    """The recipes in a fixed order: depth, MLP, heads, head_dim, hidden (each sees the previous one's shapes),
    then the layer-index score scale (GPT-2 scale_attn_by_inverse_layer_idx) of output layer `out_idx`."""
    s, t = plan.source, plan.target
    if is_new:
        layer = ops.new_layer(layer, options.layer_init, generator, options.init_std,
                              zero_gain=-1.0 if plan.spec.norm == "rms_one_plus" else 0.0)
    if t.intermediate != s.intermediate:
        layer = ops.grow_mlp(layer, t.intermediate, generator, options.init_std)
    if (t.heads, t.kv_heads) != (s.heads, s.kv_heads):
        layer = ops.regroup_heads(layer, s.heads, s.kv_heads, s.head_dim, t.heads, t.kv_heads, generator,
                                  options.init_std, full_width_k_norm=plan.spec.qk_norm == "full_width")
    if t.head_dim != s.head_dim:
        layer = ops.grow_head_dim(layer, t.heads, t.kv_heads, s.head_dim, t.head_dim, plan.rotary_dims, generator,
                                  options.init_std, plan.spec.attention_scale == "head_dim")
    if t.hidden != s.hidden and plan.spec.hidden_growth == "copies":
        layer = ops.copy_hidden_layer(layer, t.hidden // s.hidden, generator, options.init_std)
    elif t.hidden != s.hidden:
        layer = ops.grow_hidden_layer(layer, t.hidden, plan.spec.norm, generator, options.init_std)
    if plan.q_scales and out_idx is not None:
        layer = ops.scale_queries(layer, plan.q_scales[out_idx])
    return layer


def grow_globals(reader: TensorReader, plan: GrowthPlan, tied: bool, writer, generator, options: GrowOptions,
                 layer_names: set[str]) -> None:
    """Embedding, final norm, output head; any other non-layer tensor passes through when the hidden size stays."""
    spec, s, t = plan.spec, plan.source, plan.target
    embed_scale = math.sqrt(s.hidden / t.hidden) if spec.embed_scale else 1.0  # Gemma multiplies by √hidden
    # A fixed order (not a set: its order changes with Python's string hashing from one process to the next, and
    # with it the shard split of the output).
    handled = (spec.embed, *((spec.position_embed,) if spec.position_embed else ()), f"{spec.final_norm}.weight",
               f"{spec.final_norm}.bias", spec.lm_head)
    for name in (spec.embed, f"{spec.final_norm}.weight"):
        if name not in reader:
            raise NetmorphError(f"the checkpoint has no {name}: it is incomplete or not a {spec.model_type} model")
    if not tied and spec.lm_head not in reader:
        raise NetmorphError(f"the checkpoint has no {spec.lm_head} but config.json says the embeddings are not tied: "
                            "it is incomplete")
    dtype = options.output_dtype or reader.describe(spec.embed).dtype
    if t.hidden == s.hidden:
        for name in handled:
            if name in reader and not (tied and name == spec.lm_head):
                pass_through(reader, writer, name)
    elif spec.hidden_growth == "copies":
        _copy_globals(reader, spec, t.hidden // s.hidden, embed_scale, tied, writer, generator, options)
    else:
        embedding = reader.get(spec.embed)
        writer.add(spec.embed, ops.grow_embedding(embedding, t.hidden, spec.norm, embed_scale).to(dtype))
        if spec.position_embed in reader:  # GPT-2's learned positions write the residual stream like the tokens
            writer.add(spec.position_embed, ops.grow_embedding(reader.get(spec.position_embed), t.hidden,
                                                               spec.norm).to(dtype))
        # A tied head shares the embedding's scale change; the final norm undoes it.
        norm_factor = 1.0 / embed_scale if tied else 1.0
        bias_name = f"{spec.final_norm}.bias"
        weight, bias = ops.grow_norm(reader.get(f"{spec.final_norm}.weight"),
                                     reader.get(bias_name) if bias_name in reader else None, t.hidden, spec.norm,
                                     norm_factor)
        writer.add(f"{spec.final_norm}.weight", weight.to(dtype))
        if bias is not None:
            writer.add(bias_name, bias.to(dtype))
        if not tied:
            writer.add(spec.lm_head, ops.grow_lm_head(reader.get(spec.lm_head), t.hidden, generator,
                                                      options.init_std).to(dtype))
    for name in reader.keys():
        if name in handled or name in layer_names:
            continue
        if t.hidden != s.hidden:
            raise NetmorphError(f"the checkpoint holds {name}, which netmorph does not know how to grow in hidden "
                                "size: please report it")
        pass_through(reader, writer, name)


def _copy_globals(reader, spec: ArchSpec, copies: int, embed_scale: float, tied: bool, writer, generator,
                  options: GrowOptions) -> None:
    """Embedding, final norm and head for hidden growth by copies. A tied head reads the k copies of the final norm
    through the (scaled) embedding copies: the final norm's gain × 1/(k·scale) brings the logits back."""
    dtype = options.output_dtype or reader.describe(spec.embed).dtype
    writer.add(spec.embed, ops.copy_embedding(reader.get(spec.embed), copies, embed_scale).to(dtype))
    bias_name = f"{spec.final_norm}.bias"
    weight, bias = ops.copy_norm(reader.get(f"{spec.final_norm}.weight"),
                                 reader.get(bias_name) if bias_name in reader else None, copies, spec.norm,
                                 1.0 / (copies * embed_scale) if tied else 1.0)
    writer.add(f"{spec.final_norm}.weight", weight.to(dtype))
    if bias is not None:
        writer.add(bias_name, bias.to(dtype))
    if not tied:
        writer.add(spec.lm_head, ops.copy_lm_head(reader.get(spec.lm_head), copies, generator,
                                                  options.init_std).to(dtype))


def grow_tensors(reader: TensorReader, plan: GrowthPlan, tied: bool, writer, options: GrowOptions):
    """Stream every output tensor to the writer (anything with `add(name, tensor)`), one layer at a time.
    Run on a `MetaReader` into a `ManifestRecorder` (see `record_manifest`) it yields the output manifest."""
    spec = plan.spec
    layer_keys = _layer_keys(reader, spec)
    missing = [i for i in range(plan.source.layers) if i not in layer_keys]
    if missing:
        raise NetmorphError(f"the checkpoint has no weights for layer {missing[0]}: it is incomplete")
    base_seed = options.seed * 1_000_003
    grow_globals(reader, plan, tied, writer, torch.Generator().manual_seed(base_seed - 1), options,
                 {name for names in layer_keys.values() for name in names})
    cached_idx, cached = None, None
    for out_idx, (source_idx, is_new) in enumerate(plan.layer_sources):
        names = layer_keys[source_idx]
        if not is_new and _layer_unchanged(reader, plan, names, out_idx):
            read_layer(MetaReader(reader), spec, source_idx, names, plan.source)  # its shape checks, on no data
            copy_layer(reader, spec, source_idx, out_idx, names, writer)
            continue
        if source_idx != cached_idx:
            cached_idx, cached = source_idx, read_layer(reader, spec, source_idx, names, plan.source)
        layer, extras = cached
        unknown = [name for name in extras if not is_moe_tensor(spec, name)
                   and not (spec.sinks and name == spec.attention_prefix + spec.sinks)]
        if unknown and plan.attention_changes:
            raise NetmorphError(f"layer {source_idx} holds {unknown[0]}, which netmorph cannot grow with "
                                f"heads/head_dim/hidden: grow {_flag('num_layers')} or {_flag('intermediate_size')} only")
        extras = grow_extras(extras, plan, is_new)
        dtype = options.output_dtype or reader.describe(names[0]).dtype
        # One generator per output layer: its bytes do not depend on the other layers.
        generator = torch.Generator().manual_seed(base_seed + out_idx)
        grown = grow_layer(layer, plan, is_new, options, generator, out_idx)
        write_layer(grown, extras, spec, out_idx, plan.target, dtype, writer)
        log.debug("layer %d ← %s layer %d", out_idx, "new, from" if is_new else "source", source_idx)


def _layer_unchanged(reader: TensorReader, plan: GrowthPlan, names: list[str], out_idx: int) -> bool:
    """A source layer that only grows in depth (no width change, no per-layer q rescale) and has one dtype comes out
    as the same bytes: `copy_layer` copies its tensors file to file instead of computing them (float64 and back is
    lossless)."""
    s, t = plan.source, plan.target
    if plan.q_scales and plan.q_scales[out_idx] != 1.0:
        return False
    if (s.intermediate, s.heads, s.kv_heads, s.head_dim, s.hidden) != (t.intermediate, t.heads, t.kv_heads,
                                                                        t.head_dim, t.hidden):
        return False
    return len({reader.describe(name).dtype for name in names}) == 1


def copy_layer(reader: TensorReader, spec: ArchSpec, source_idx: int, out_idx: int, names: list[str], writer) -> None:
    """Source layer `source_idx`'s tensors under output layer `out_idx`'s prefix, byte for byte (`pass_through`: file
    to file when the writer can)."""
    source_prefix, out_prefix = spec.layer_prefix.format(i=source_idx), spec.layer_prefix.format(i=out_idx)
    for name in names:
        pass_through(reader, writer, name, out_prefix + name[len(source_prefix):])
    log.debug("layer %d ← source layer %d (copied)", out_idx, source_idx)


# ── the surgery ─────────────────────────────────────────────────────────────────────────────────────────────────


def describe(plan: GrowthPlan) -> str:
    """The changed sizes as "dim old→new, …", or "no change"."""
    s, t = asdict(plan.source), asdict(plan.target)
    return ", ".join(f"{k} {s[k]}→{t[k]}" for k in s if s[k] != t[k]) or "no change"


class GrowSurgery(Surgery):
    """A larger checkpoint of the same stock architecture that computes the same function (module docstring)."""

    command = "grow"
    verb = "growing"
    tags = ("growth",)

    def __init__(self, source, options: GrowOptions):
        super().__init__(source, options)
        self.spec = spec_for(source.config.model_type, self.command)
        self.source_backend = self.output_backend = self.spec.attention_backend
        self.plan = plan_growth(source.config, self.spec, options)
        self.config = target_config(source.config, self.plan)  # transformers' own validation, before any tensor
        self.stored_dtype = source.stored_dtype()  # the weights' most common dtype, as convert-diff-transformer reads it
        self.out_dtype = options.output_dtype or self.stored_dtype
        self.config.dtype = self.out_dtype
        self.tied = self.spec.is_tied(source.config)
        self.verify_dtype = getattr(torch, options.verify_dtype)

    def _cast(self, writer):
        """--dtype other than the source's: every floating tensor is stored in it."""
        return writer if self.out_dtype == self.stored_dtype else CastingWriter(writer, self.out_dtype)

    def stream(self, reader: TensorReader, writer) -> None:
        """Every output tensor to `writer` (`grow_tensors`), cast to --dtype when it differs from the source's."""
        grow_tensors(reader, self.plan, self.tied, self._cast(writer), self.options)

    def stream_meta(self, reader: TensorReader, recorder) -> None:
        """Random draws happen on the meta device too; a fixed init std stands in for each tensor's own std (a data
        value)."""
        planning = self.options.model_copy(update={"init_std": self.options.init_std or 1.0})
        with torch.device("meta"):
            grow_tensors(MetaReader(reader), self.plan, self.tied, self._cast(recorder), planning)

    def layerwise_refusal(self) -> str | None:
        """Refused when the depth or the hidden size changes (layer i is compared with layer i, on hidden states of
        one width), and for families whose experts transformers fuses on load (modules are loaded by stored name)."""
        if self.spec.experts_fused_on_load:
            return FUSED_EXPERTS
        s, t = self.plan.source, self.plan.target
        if (s.layers, s.hidden) != (t.layers, t.hidden):
            return "it changes the depth or the hidden size, and layer-wise verification compares layer i with layer i"
        return None

    def tolerance(self, original, tokenizer, texts: dict[str, str], dtype: torch.dtype) -> tuple[float, str]:
        """--tolerance; for a bf16/fp16 checkpoint whose recipe rescales weights, twice the source's own error in that
        dtype when larger. No factor like √(n/n′) is exact there, so the checkpoint may change the function by about
        as much as running the source in its own precision does (measured on tiny models, checkpoint / own
        rounding: Llama bf16 0.3–0.6, fp16 0.3–0.4; StableLM's mean-filled LayerNorms fp16 1.1). Greedy text is then
        compared but not required to match: that much noise flips near-ties (the source's own text changes when it
        runs in that dtype). `--dtype float32` writes the rescaled weights exactly instead."""
        tolerance = self.options.tolerance
        if not (self.plan.rescales and self.out_dtype in (torch.bfloat16, torch.float16)):
            return tolerance, ""
        rounding = own_rounding(original, tokenizer, texts, self.out_dtype, dtype)
        if 2 * rounding <= tolerance:
            return tolerance, ""
        name = str(self.out_dtype).removeprefix("torch.")
        return 2 * rounding, (f"2 × the source's own {name} rounding on these texts (the rescaled weights are stored "
                              f"in {name}; --dtype float32 keeps them exact)")

    def card(self) -> Card:
        """The growth's card: what grew, the stock class that loads it, and how the new parameters start."""
        model_class = (self.config.architectures
                       or [f"{type(self.config).__name__.removesuffix('Config')}ForCausalLM"])[0]
        return Card(f"Grown `{self.source.description}`", [
            f"- Growth: {describe(self.plan)}.",
            f"- Stock architecture: loads with `{model_class}` / `AutoModelForCausalLM`, no remote code.",
            "- The new parameters are initialised so the model computes the source's function: one side of each new "
            "path (output projections, new key dims, new embedding columns) starts at zero, the other side is random, "
            "so every new parameter trains."])

    def summary(self) -> str:
        """The changed sizes (`describe`)."""
        return describe(self.plan)


def grow(source_arg: str | None, output_dir: str | Path | None, options: GrowOptions):
    """SOURCE → a grown checkpoint of the same stock architecture, verified. Returns the pipeline's Result (its
    `plan` is the GrowthPlan); raises NetmorphError on bad input, VerificationFailed when the proof fails."""
    return run(GrowSurgery, source_arg, output_dir, options)


__all__ = ["Dims", "GrowSurgery", "GrowthPlan", "grow", "plan_growth"]
