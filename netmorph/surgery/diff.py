"""`convert-diff-transformer`: attention → differential attention (Ye et al. 2024, or DIFF V2), as a surgery of the
pipeline (netmorph/pipeline.py). Two targets:

- netmorph's differential model (`DiffSurgery`): every family's stock model with `NetmorphDiffAttention`; exact
  modes compute the source's function (mix = 0), and the modeling code is copied next to the weights;
- the stock transformers DiffLlama (`DiffLlamaSurgery`, `--export diffllama`): no remote code at all, approximate
  (its per-head norm always runs); the construction is netmorph/ops/diffllama.py.
"""

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from netmorph.arch import ArchSpec, spec_for
from netmorph.arch.families import FUSED_EXPERTS
from netmorph.arch.layer_view import LayerView
from netmorph.errors import NetmorphError
from netmorph.io.reader import TensorReader
from netmorph.io.streaming import pass_through
from netmorph.ops import qkv_layout
from netmorph.ops.diff_attention import DiffAttentionRecipe, convert_attention_tensors
from netmorph.ops.diffllama import diffllama_attention_tensors
from netmorph.options import ConvertOptions
from netmorph.pipeline import Card, Surgery, run
from netmorph.sources import default_text_files

log = logging.getLogger("netmorph")

MODELING_DIR = Path(__file__).parent.parent / "modeling"
MODELING_FILES = ("configuration_netmorph_diff.py", "modeling_netmorph_diff.py", "split_diff_kernel.py")
AXOLOTL_PLUGIN = "netmorph.integrations.axolotl.DifferentialTransformerPlugin"
ATTENTION_TENSORS = ("q_proj", "k_proj", "v_proj", "o_proj")
# The attention roles of a family spec whose tensors the conversion rewrites; every other tensor passes through.
ATTENTION_ROLES = ("q", "k", "v", "qkv", "o")
# Source config entries that describe the file rather than the model: the converted config sets its own.
FILE_CONFIG_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype",
                    "_name_or_path")

MODE_NOTES = {
    "normal": "negative q/k: small zero-mean normal. Exact while mix = 0; the warm-up of `mix` brings the negative "
    "branch in gradually.",
    "zero": "negative q/k: zeros. Exact while mix = 0. Caveat: zero q2 *and* zero k2 is a saddle — neither receives a "
    "gradient (the negative branch is a uniform average until something else moves it).",
    "mirror": "negative q/k: copies of the positive ones. Exact while mix = 0; at mix > 0 the layer computes "
    "(1 − λ)·attention until the branches diverge in training.",
    "split": "split heads: half of the pretrained heads become the negative component (q/k copied). Approximate: "
    "only H/2 positive attention patterns remain.",
    "sublayer_norm": "sub-layer norm: the paper's per-head RMSNorm before o_proj. Approximate: no linear map undoes "
    "a normalisation.",
    "v2": "DIFF V2: query heads 2j and 2j + 1 both copy source head j, lambda_proj = 0 (λ = sigmoid(0) = 0.5) and "
    "o_proj × 2, so 2·(a − 0.5·a) = a: exact with no mix; the paired heads get different gradients (2g and −g) and "
    "diverge in training. K/V and the KV cache are the source model's.",
    "lambda_zero": "λ start 'zero': λ_init = 0 and the four λ vectors equal one non-zero vector, so λ = 0 exactly at "
    "any mix and every λ vector still receives a gradient.",
}


LAMBDA_V1 = ("λ = mix · (exp(λq1·λk1) − exp(λq2·λk2) + λ_init). `mix` is a buffer in the checkpoint, 0 after conversion;",
             "raise it during fine-tuning (a linear warm-up from 0 to 1) to switch the negative branch on.")
LAMBDA_V2 = ("Differential head j = out[2j] − λ·out[2j + 1] with λ = sigmoid(lambda_proj(x)) per token and head; "
             "lambda_proj = 0 after conversion (λ = 0.5), o_proj doubled.",)


def head_counts(config, spec: ArchSpec) -> tuple[int, int, int]:
    """(query heads H, KV heads G, head_dim d) of a source config."""
    return config.num_attention_heads, spec.num_kv_heads(config), spec.head_dim(config)


def check_convertible(config, spec: ArchSpec, options: ConvertOptions) -> None:
    """Refuse, before any tensor is read, what the conversion cannot do for this config: raises NetmorphError for
    --split-heads with an odd query or KV head count, and for an ALiBi model."""
    heads, num_kv, _ = head_counts(config, spec)
    if options.split_heads and (heads % 2 or num_kv % 2):
        raise NetmorphError(
            f"--split-heads needs even head counts, but the model has {heads} query and {num_kv} KV "
            "heads: drop --split-heads to use the doubled-heads layout"
        )
    if spec.rope_kind(config) == "alibi":
        raise NetmorphError(
            f"this {spec.model_type} model uses ALiBi position biases (config {spec.alibi_field}=true), which "
            "convert-diff-transformer does not carry into differential attention: convert a RoPE model of the family"
        )


def target_config(source_config, spec: ArchSpec, options: ConvertOptions, dtype: torch.dtype):
    """The converted model's config: the family's stock config class under model_type "netmorph_diff_<family>"
    (`NetmorphDiff<Family>Config`), every source field kept, plus the differential fields and `diff_attention`."""
    from netmorph.modeling.modeling_netmorph_diff import family_model_class

    check_convertible(source_config, spec, options)
    model_class = family_model_class(spec.model_type)
    config_class = model_class.config_class
    values = {k: v for k, v in source_config.to_dict().items() if k not in FILE_CONFIG_KEYS}
    return config_class(
        **values,
        diff_layout=options.diff_layout,
        sublayer_norm=options.sublayer_norm,
        lambda_std=options.lambda_std,
        source_model_type=spec.model_type,
        diff_attention=attention_features(source_config, spec),
        architectures=[model_class.__name__],
        auto_map={"AutoConfig": f"configuration_netmorph_diff.{config_class.__name__}",
                  "AutoModelForCausalLM": f"modeling_netmorph_diff.{model_class.__name__}"},
        dtype=str(dtype).removeprefix("torch."),
    )


def llama_fields(c, spec: ArchSpec) -> dict:
    """The config fields a Llama-style target (netmorph's own model, DiffLlama) copies from a Llama-family source."""
    _, _, head_dim = head_counts(c, spec)
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, head_dim=head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        rope_parameters=dict(c.rope_parameters), pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
    )


def attention_features(config, spec: ArchSpec) -> dict:
    """The data the differential attention of a stock-family model reads (modeling_netmorph_diff.AttentionFeatures
    and install_differential_attention), from the source config and the family spec."""
    heads, num_kv, head_dim = head_counts(config, spec)
    layers = range(config.num_hidden_layers)
    base_scale = spec.attention_scaling(config, head_dim)
    by_layer_index = bool(spec.layer_index_scaling_field and getattr(config, spec.layer_index_scaling_field, False))
    window = getattr(config, "sliding_window", None)
    return {
        "layers": spec.layer_prefix.removesuffix(".{i}."),
        "attention": spec.attention_prefix.removesuffix("."),
        "qk_norms": list(spec.qk_norm_modules) if spec.has_qk_norm(config) else [],
        "qk_norm": spec.qk_norm if spec.has_qk_norm(config) else "none",
        "num_heads": heads,
        "num_key_value_heads": num_kv,
        "head_dim": head_dim,
        "qkv_bias": spec.bias(config, "qkv"),
        "o_bias": spec.bias(config, "o"),
        "scaling": [base_scale / (i + 1) if by_layer_index else base_scale for i in layers],
        "softcap": getattr(config, "attn_logit_softcapping", None),
        "sliding_windows": [window if kind == "sliding_attention" else None for kind in spec.layer_types(config)],
        "rope_layers": spec.rope_layers(config),
        "rotary_halves": spec.rotary_halves,
        "sinks": bool(spec.sinks),
        "norm_eps": getattr(config, spec.eps_field),
        "is_causal": not getattr(config, "use_bidirectional_attention", False),
        "attention_dropout": float(getattr(config, spec.attention_dropout_field, 0.0) or 0.0)
        if spec.attention_dropout_field else 0.0,
        "output_dropout": float(getattr(config, spec.output_dropout_field, 0.0) or 0.0)
        if spec.output_dropout_field else 0.0,
    }


def _expected_shape(name: str, config, spec: ArchSpec) -> tuple[int, ...]:
    heads, num_kv, d = head_counts(config, spec)
    hidden = config.hidden_size
    rows = {"q_proj": heads * d, "o_proj": hidden}.get(name, num_kv * d)
    return (rows, heads * d if name == "o_proj" else hidden)


def convert_tensors(
    reader: TensorReader,
    config,
    spec: ArchSpec,
    recipe: DiffAttentionRecipe,
    writer,
    seed: int,
) -> None:
    """Stream every tensor of the source to the writer (anything with `add(name, tensor)`), converting each layer's
    attention on the way. Run on a `MetaReader` into a `ManifestRecorder` it yields the output manifest."""
    stream_attention_layers(reader, config, spec, writer,
                            lambda layer_idx: convert_layer(reader, config, spec, recipe, layer_idx, seed))


def stream_attention_layers(reader: TensorReader, config, spec: ArchSpec, writer,
                            convert_attention: Callable[[int], dict[str, torch.Tensor]]) -> None:
    """Every source tensor to the writer; each layer's attention tensors replaced, once per layer, by
    `convert_attention(layer_idx)` (output names → tensors); everything else passes through."""
    attention_names = {
        spec.name(i, role, kind): i
        for i in range(config.num_hidden_layers)
        for role in ATTENTION_ROLES
        if role in spec.tensors
        for kind in ("weight", "bias")
    }
    if spec.sinks:  # GPT-OSS: the per-head sink logits are converted with the layer (see `sink_tensor`)
        attention_names.update({spec.attention_key(i, spec.sinks): i for i in range(config.num_hidden_layers)})
    done_layers = set()
    for name in reader.keys():
        name_out = spec.module_name(name)
        if name_out == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied to the embedding: transformers rebuilds it at load time
        layer_idx = attention_names.get(name)
        if layer_idx is None:
            pass_through(reader, writer, name, name_out)
            continue
        if layer_idx in done_layers:
            continue
        done_layers.add(layer_idx)
        for name_out, tensor in convert_attention(layer_idx).items():
            writer.add(name_out, tensor)
    missing = sorted(set(range(config.num_hidden_layers)) - done_layers)
    if missing:
        raise NetmorphError(f"the checkpoint has no attention weights for layer {missing[0]}: it is incomplete")


def attention_view(config, spec: ArchSpec) -> LayerView:
    """The source's layers as its family stores them, with the head counts of its config."""
    heads, num_kv, head_dim = head_counts(config, spec)
    return LayerView(spec, qkv_layout.Heads(heads, num_kv), head_dim)


def read_attention(reader: TensorReader, config, spec: ArchSpec, layer_idx: int) -> dict[str, torch.Tensor]:
    """One layer's attention as separate {q,k,v,o}_proj.{weight,bias} in nn.Linear layout ([out, in]), read through
    the family's LayerView (a fused QKV tensor split by its layout), so every family converts through the same
    function. Raises NetmorphError for an absent weight or a shape config.json does not imply."""
    view = attention_view(config, spec)
    layer, _ = view.read(reader, layer_idx, roles=ATTENTION_ROLES)
    view.require(layer, ("q", "k", "v", "o"), layer_idx)
    view.check_shapes(layer, {f"{proj[0]}.weight": _expected_shape(proj, config, spec) for proj in ATTENTION_TENSORS},
                      layer_idx)
    return {f"{role}_proj.{kind}": layer[f"{role}.{kind}"].contiguous()
            for kind in ("weight", "bias") for role in "qkvo" if f"{role}.{kind}" in layer}


def sink_tensor(sinks: torch.Tensor, layout: str) -> torch.Tensor:
    """GPT-OSS's learned per-head sink logits (H,) for the differential layouts. A sink is one more softmax column
    per query head, with no value: it takes probability mass away from the keys. Each component of a differential
    head is its own softmax, so each gets a sink:
    - "doubled": (2H,) — the positive heads keep the source's sinks (so the positive map is the source's attention
      exactly), the negative heads start with copies of them (a learned logit like the others; at mix = 0 the
      negative map is multiplied by λ = 0, so its sink cannot change the output);
    - "v2": (2H,) — query heads 2j and 2j + 1 both copy source head j, so both copy its sink: both heads compute the
      source head's output a, and 2·(a − 0.5·a) = a holds with the sink inside a;
    - "split": (H,) unchanged — heads [0, H/2) are the positive component with their own sinks, [H/2, H) the
      negative one (approximate, like the split layout itself)."""
    if layout == "doubled":
        return torch.cat([sinks, sinks.clone()])
    if layout == "v2":
        return sinks.repeat_interleave(2)
    return sinks.clone()


def convert_layer(
    reader: TensorReader, config, spec: ArchSpec, recipe: DiffAttentionRecipe, layer_idx: int, seed: int
) -> dict[str, torch.Tensor]:
    """Layer `layer_idx`'s attention tensors read from `reader`, converted by the recipe, under their full output
    names. The random draws come from one generator seeded with seed·1000003 + layer_idx, so a layer's bytes depend
    only on the seed and its index. Raises NetmorphError (via `read_attention`) for an absent weight or a shape
    config.json does not imply."""
    attn = read_attention(reader, config, spec, layer_idx)
    heads, _, head_dim = head_counts(config, spec)
    # One generator per layer: the bytes of a layer do not depend on which other layers exist or their order.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer_idx)
    converted = convert_attention_tensors(attn, layer_idx, heads, head_dim, recipe, generator)
    if spec.sinks:
        key = spec.attention_key(layer_idx, spec.sinks)
        if key not in reader:
            raise NetmorphError(f"the checkpoint has no {key}: it is incomplete or not a {spec.model_type} model")
        sinks = reader.get(key)
        if tuple(sinks.shape) != (heads,):
            raise NetmorphError(f"{key} has shape {tuple(sinks.shape)} but config.json implies ({heads},): the "
                                "weights and config.json do not belong together")
        converted[spec.sinks] = sink_tensor(sinks, recipe.layout)
    log.debug("layer %d: attention → differential (%s layout, negative init %s)", layer_idx, recipe.layout, recipe.negative_init)
    return {spec.attention_key(layer_idx, name): tensor for name, tensor in converted.items()}


def recipe_from(options: ConvertOptions) -> DiffAttentionRecipe:
    """The DiffAttentionRecipe of these command options."""
    return DiffAttentionRecipe(
        layout=options.diff_layout,
        negative_init=options.negative_init,
        negative_std=options.negative_std,
        lambda_start=options.lambda_start,
        lambda_std=options.lambda_std,
        sublayer_norm=options.sublayer_norm,
    )


def write_training_yaml(directory: Path, yaml_config: dict | None, output_dir: Path) -> None:
    """config.yml for `netmorph train` / axolotl: the input YAML (or a fresh one) pointed at the converted model."""
    data = dict(yaml_config or {})
    data["base_model"] = str(output_dir.resolve())
    if not data.get("output_dir") or Path(data["output_dir"]).expanduser().resolve() == output_dir.resolve():
        data["output_dir"] = str(output_dir.resolve()) + "-finetuned"
    plugins = list(data.get("plugins") or [])
    if AXOLOTL_PLUGIN not in plugins:
        plugins.append(AXOLOTL_PLUGIN)
    data["plugins"] = plugins
    data["diff_attention"] = True
    if yaml_config is None:
        for key, value in fresh_training_settings().items():
            data.setdefault(key, value)
    (directory / "config.yml").write_text(yaml.safe_dump(data, sort_keys=False))


def fresh_training_settings() -> dict:
    """A short, runnable fine-tune for a config.yml written without an input YAML: real text from this machine,
    a λ warm-up over the first half, metrics every 10 steps. Edit it for real work."""
    settings = {"sequence_len": 512, "micro_batch_size": 1, "gradient_accumulation_steps": 1, "max_steps": 100,
                "learning_rate": 2e-5, "logging_steps": 10, "diff_attn_warmup_steps": 50, "diff_attn_log_every": 10,
                "diff_attn_num_monitor_layers": 3}
    files = default_text_files()
    if len(files) >= 2:
        settings["datasets"] = [{"path": str(files[1]), "type": "completion"}]
        settings["test_datasets"] = [{"path": str(files[0]), "type": "completion"}]
    return settings


def mode_notes(options: ConvertOptions) -> list[str]:
    """The model card's lines on the chosen conversion mode (MODE_NOTES entries)."""
    if options.variant == "v2":
        return [MODE_NOTES["v2"]]
    notes = [MODE_NOTES["split"] if options.split_heads else MODE_NOTES[options.negative_init]]
    if options.sublayer_norm:
        notes.append(MODE_NOTES["sublayer_norm"])
    if options.lambda_start == "zero":
        notes.append(MODE_NOTES["lambda_zero"])
    return notes


class DiffSurgery(Surgery):
    """Attention → netmorph's differential attention, every other tensor kept (see the module docstring)."""

    command = "convert-diff-transformer"
    verb = "converting"
    tags = ("differential-attention",)

    def __init__(self, source, options: ConvertOptions):
        super().__init__(source, options)
        self.spec = spec_for(source.config.model_type, self.command)
        self.source_backend = self.output_backend = self.spec.attention_backend
        # the weights' dtype (the most common floating dtype, from the headers): an fp32 norm listed first does not
        # make a bf16 checkpoint's config say float32
        self.config = target_config(source.config, self.spec, options, source.stored_dtype())
        self.recipe = recipe_from(options)

    @property
    def exact(self) -> bool:
        """`options.exact`: False with --split-heads or --sublayer-norm."""
        return self.options.exact

    def layerwise_refusal(self) -> str | None:
        """Refused for families whose experts transformers fuses on load (layer-wise loads modules by stored name)."""
        return FUSED_EXPERTS if self.spec.experts_fused_on_load else None

    def stream(self, reader: TensorReader, writer) -> None:
        """Every tensor to `writer`, each layer's attention converted by `convert_tensors`."""
        convert_tensors(reader, self.config, self.spec, self.recipe, writer, self.options.seed)

    def write_files(self, directory: Path, output_dir: Path) -> None:
        """Copy the three modeling files (MODELING_FILES) next to the weights and write config.yml for `netmorph
        train` / axolotl."""
        for name in MODELING_FILES:
            shutil.copy2(MODELING_DIR / name, directory / name)
        write_training_yaml(directory, self.source.yaml_config, output_dir)

    def load_output(self, directory: Path, dtype: torch.dtype):
        """The written model loaded with netmorph's class for the family directly (no remote code), in `dtype` on
        `output_backend`."""
        from netmorph.modeling.modeling_netmorph_diff import family_model_class

        return family_model_class(self.spec.model_type).from_pretrained(
            str(directory), dtype=dtype, attn_implementation=self.output_backend).eval()

    def card(self) -> Card:
        """The conversion's card: the mode notes, the λ formula of the variant and how to fine-tune; loading needs
        remote code."""
        lam = LAMBDA_V2 if self.options.variant == "v2" else LAMBDA_V1
        return Card(f"Differential-attention conversion of `{self.source.description}`",
                    [*(f"- {note}" for note in mode_notes(self.options)), "", *lam, "",
                     "Fine-tune with `netmorph train config.yml` or axolotl with the plugin listed in `config.yml`."],
                    remote_code=True)

    def summary(self) -> str:
        """What changed: "N attention layers → <layout> differential attention"."""
        return f"{self.config.num_hidden_layers} attention layers → {self.options.diff_layout} differential attention"


class DiffLlamaSurgery(DiffSurgery):
    """`--export diffllama`: attention → the stock transformers DiffLlama layout (approximate, no remote code)."""

    tags = ("differential-attention", "diffllama")

    def __init__(self, source, options: ConvertOptions):
        Surgery.__init__(self, source, options)
        self.spec = spec_for(source.config.model_type)
        self.config = diffllama_config(source.config, self.spec, source.stored_dtype())

    @property
    def exact(self) -> bool:
        """Always False: DiffLlama's per-head RMSNorm always runs, so the export is approximate."""
        return False

    def stream(self, reader: TensorReader, writer) -> None:
        """Every tensor to `writer`, each layer's attention replaced by `diffllama_attention_tensors` (doubled q/k,
        anchored v, interleaved o_proj, λ = 0)."""
        heads, _, head_dim = head_counts(self.source.config, self.spec)
        options = self.options

        def export_layer(layer_idx: int) -> dict[str, torch.Tensor]:
            """Layer `layer_idx`'s attention as stock DiffLlama tensors under their full names (seeded with
            seed·1000003 + layer_idx)."""
            attn = read_attention(reader, self.source.config, self.spec, layer_idx)  # shapes checked
            generator = torch.Generator().manual_seed(options.seed * 1_000_003 + layer_idx)
            converted = diffllama_attention_tensors(attn, layer_idx, heads, head_dim, options.diffllama_anchor,
                                                    self.config.rms_norm_eps, options.negative_init,
                                                    options.negative_std, generator)
            return {self.spec.attention_key(layer_idx, name): tensor for name, tensor in converted.items()}

        stream_attention_layers(reader, self.config, self.spec, writer, export_layer)

    def write_files(self, directory: Path, output_dir: Path) -> None:
        """Nothing: a stock class needs no modeling code and no differential training config."""
        pass  # a stock class: no modeling code, no differential training config

    def layerwise_refusal(self) -> str | None:
        """Always refused: the export is approximate, and its measure is the whole model's divergence."""
        return "the export is approximate, and its proof is the whole model's divergence"

    def load_output(self, directory: Path, dtype: torch.dtype):
        """The base loader: the written checkpoint through AutoModelForCausalLM (stock DiffLlama)."""
        return Surgery.load_output(self, directory, dtype)

    def card(self) -> Card:
        """The export's card: a stock DiffLlamaForCausalLM (no remote code), the doubled heads and the anchor."""
        return Card(f"DiffLlama export of `{self.source.description}`", [
            "- A stock transformers `DiffLlamaForCausalLM` (no remote code). Query and KV heads are doubled (the "
            "source's heads first, new negative heads after them), λ = 0 through the λ vectors, and a value anchor of "
            f"{self.options.diffllama_anchor:g} keeps DiffLlama's mandatory per-head RMSNorm nearly linear."])

    def summary(self) -> str:
        """What changed: "N attention layers → stock DiffLlama"."""
        return f"{self.config.num_hidden_layers} attention layers → stock DiffLlama"


EXPORTABLE_FAMILIES = ("llama", "mistral", "qwen2")


def diffllama_config(source_config, spec: ArchSpec, dtype: torch.dtype):
    """The DiffLlama config with 2H query and 2G KV heads of the source's head_dim, or a one-line refusal naming what
    DiffLlama cannot represent."""
    from transformers import DiffLlamaConfig

    c = source_config
    if c.model_type not in EXPORTABLE_FAMILIES:
        raise NetmorphError(
            f"--export diffllama takes a {', '.join(EXPORTABLE_FAMILIES)} model, not {c.model_type!r}: DiffLlama is "
            "Llama with differential attention; convert without --export to use netmorph's own model"
        )
    if "sliding_attention" in spec.layer_types(c):
        raise NetmorphError(
            "--export diffllama cannot represent sliding-window attention (DiffLlama attends to the whole context): "
            "convert without --export to keep the window"
        )
    if getattr(c, "mlp_bias", False):
        raise NetmorphError(
            "--export diffllama cannot represent MLP biases (DiffLlama's MLP has none): convert without --export"
        )
    if getattr(c, "attention_dropout", 0.0):
        raise NetmorphError(
            f"--export diffllama needs attention_dropout 0 (DiffLlama refuses dropout), the source has "
            f"{c.attention_dropout}: set attention_dropout to 0 in config.json"
        )
    heads, num_kv, _ = head_counts(c, spec)
    return DiffLlamaConfig(
        **llama_fields(c, spec),
        num_attention_heads=2 * heads,
        num_key_value_heads=2 * num_kv,
        attention_bias=True,  # the value anchor is a v bias; DiffLlama has one flag for all four projections
        attention_dropout=0.0,
        architectures=["DiffLlamaForCausalLM"],
        dtype=str(dtype).removeprefix("torch."),
    )


def convert_diff_transformer(source_arg: str | Path | None, output_dir: str | Path | None, options: ConvertOptions):
    """SOURCE → a differential-attention checkpoint (or, with --export diffllama, a stock DiffLlama one), verified.
    Returns the pipeline's Result; raises NetmorphError on bad input, VerificationFailed when an exact mode's proof
    fails."""
    surgery = DiffLlamaSurgery if options.export == "diffllama" else DiffSurgery
    return run(surgery, source_arg, output_dir, options)
