"""`convert-diff-transformer`: SOURCE → differential-attention checkpoint, verified, written atomically."""

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from netmorph.arch import ArchSpec, spec_for
from netmorph.errors import NetmorphError
from netmorph.io.reader import MetaReader, SafetensorsReader, TensorReader, TensorSpec
from netmorph.io.streaming import StreamingWriter, pass_through, plan_output, release_freed_memory
from netmorph.io.writer import atomic_output_dir, check_output_dir
from netmorph.modeling.configuration_netmorph_diff import NetmorphDiffConfig
from netmorph.ops.diff_attention import DiffAttentionRecipe, convert_attention_tensors
from netmorph.options import ConvertOptions, parse_size
from netmorph.sources import Source, default_text_files, default_texts, resolve_source
from netmorph.verify import VerifyReport, compare_models

log = logging.getLogger("netmorph")

MODELING_DIR = Path(__file__).parent / "modeling"
MODELING_FILES = ("configuration_netmorph_diff.py", "modeling_netmorph_diff.py")
AUTO_MAP = {
    "AutoConfig": "configuration_netmorph_diff.NetmorphDiffConfig",
    "AutoModel": "modeling_netmorph_diff.NetmorphDiffModel",
    "AutoModelForCausalLM": "modeling_netmorph_diff.NetmorphDiffForCausalLM",
}
AXOLOTL_PLUGIN = "netmorph.integrations.axolotl.DifferentialTransformerPlugin"
ATTENTION_TENSORS = ("q_proj", "k_proj", "v_proj", "o_proj")

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
    "lambda_zero": "λ start 'zero': λ_init = 0 and the four λ vectors equal one non-zero vector, so λ = 0 exactly at "
    "any mix and every λ vector still receives a gradient.",
}


@dataclass
class ConversionResult:
    output_dir: Path
    config: NetmorphDiffConfig
    reports: list[VerifyReport] = field(default_factory=list)


def target_config(source_config, spec: ArchSpec, options: ConvertOptions, dtype: torch.dtype) -> NetmorphDiffConfig:
    c = source_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    num_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    if options.split_heads and (c.num_attention_heads % 2 or num_kv % 2):
        raise NetmorphError(
            f"--split-heads needs even head counts, but the model has {c.num_attention_heads} query and {num_kv} KV "
            "heads: drop --split-heads to use the doubled-heads layout"
        )
    layer_types = spec.layer_types(c)
    return NetmorphDiffConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=num_kv,
        head_dim=head_dim,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        rope_parameters=dict(c.rope_parameters),
        attention_dropout=getattr(c, "attention_dropout", 0.0),
        mlp_bias=bool(getattr(c, "mlp_bias", False)),
        qkv_bias=spec.bias(c, "qkv"),
        o_bias=spec.bias(c, "o"),
        sliding_window=getattr(c, "sliding_window", None) if "sliding_attention" in layer_types else None,
        layer_types=layer_types,
        diff_layout="split" if options.split_heads else "doubled",
        sublayer_norm=options.sublayer_norm,
        lambda_std=options.lambda_std,
        source_model_type=c.model_type,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        architectures=["NetmorphDiffForCausalLM"],
        auto_map=AUTO_MAP,
        dtype=str(dtype).removeprefix("torch."),
    )


def _expected_shape(name: str, config: NetmorphDiffConfig) -> tuple[int, ...]:
    d, hidden = config.head_dim, config.hidden_size
    rows = {"q_proj": config.num_attention_heads * d, "o_proj": hidden}.get(name, config.num_key_value_heads * d)
    return (rows, config.num_attention_heads * d if name == "o_proj" else hidden)


def convert_tensors(
    reader: TensorReader,
    config: NetmorphDiffConfig,
    spec: ArchSpec,
    recipe: DiffAttentionRecipe,
    writer,
    seed: int,
) -> None:
    """Stream every tensor of the source to the writer (anything with `add(name, tensor)`), converting each layer's
    attention on the way. Run on a `MetaReader` into a `PlanRecorder` it yields the output plan."""
    attention_names = {
        spec.attention_key(i, f"{proj}.{kind}"): i
        for i in range(config.num_hidden_layers)
        for proj in ATTENTION_TENSORS
        for kind in ("weight", "bias")
    }
    done_layers = set()
    for name in reader.keys():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied to the embedding: transformers rebuilds it at load time
        layer_idx = attention_names.get(name)
        if layer_idx is None:
            pass_through(reader, writer, name)
            continue
        if layer_idx in done_layers:
            continue
        done_layers.add(layer_idx)
        for name_out, tensor in convert_layer(reader, config, spec, recipe, layer_idx, seed).items():
            writer.add(name_out, tensor)
    missing = sorted(set(range(config.num_hidden_layers)) - done_layers)
    if missing:
        raise NetmorphError(f"the checkpoint has no attention weights for layer {missing[0]}: it is incomplete")


def convert_layer(
    reader: TensorReader, config: NetmorphDiffConfig, spec: ArchSpec, recipe: DiffAttentionRecipe, layer_idx: int, seed: int
) -> dict[str, torch.Tensor]:
    attn = {}
    for proj in ATTENTION_TENSORS:
        key = spec.attention_key(layer_idx, f"{proj}.weight")
        if key not in reader:
            raise NetmorphError(f"the checkpoint has no {key}: it is incomplete or not a {spec.model_type} model")
        attn[f"{proj}.weight"] = reader.get(key)
        expected = _expected_shape(proj, config)
        if tuple(attn[f"{proj}.weight"].shape) != expected:
            raise NetmorphError(
                f"{key} has shape {tuple(attn[f'{proj}.weight'].shape)} but config.json implies {expected}: "
                "the weights and config.json do not belong together"
            )
        bias_key = spec.attention_key(layer_idx, f"{proj}.bias")
        if bias_key in reader:
            attn[f"{proj}.bias"] = reader.get(bias_key)
    # One generator per layer: the bytes of a layer do not depend on which other layers exist or their order.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer_idx)
    converted = convert_attention_tensors(attn, layer_idx, config.num_attention_heads, config.head_dim, recipe, generator)
    log.debug("layer %d: attention → differential (%s layout, negative init %s)", layer_idx, recipe.layout, recipe.negative_init)
    return {spec.attention_key(layer_idx, name): tensor for name, tensor in converted.items()}


def recipe_from(options: ConvertOptions) -> DiffAttentionRecipe:
    return DiffAttentionRecipe(
        layout="split" if options.split_heads else "doubled",
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
    notes = [MODE_NOTES["split"] if options.split_heads else MODE_NOTES[options.negative_init]]
    if options.sublayer_norm:
        notes.append(MODE_NOTES["sublayer_norm"])
    if options.lambda_start == "zero":
        notes.append(MODE_NOTES["lambda_zero"])
    return notes


def write_model_card(directory: Path, source: Source, options: ConvertOptions, reports: list[VerifyReport]) -> None:
    flags = {k: v for k, v in options.model_dump().items()
             if k not in ("force", "debug", "verify", "verify_mode", "progress")}
    exactness = (
        "**Exact** at conversion: the converted model computes the source model's function (mix = 0)."
        if options.exact
        else "**Approximate**: this mode changes the function; fine-tune to recover. The measured divergence is below."
    )
    lines = [
        "---",
        "library_name: transformers",
        "tags: [netmorph, differential-attention]",
        "---",
        f"# Differential-attention conversion of `{source.description}`",
        "",
        "Converted by [netmorph](https://pypi.org/project/netmorph/) `convert-diff-transformer`.",
        "",
        f"- Source: `{source.description}` (model_type `{source.config.model_type}`)",
        f"- Options: `{json.dumps(flags)}`",
        f"- {exactness}",
        *[f"- {note}" for note in mode_notes(options)],
        "",
        "λ = mix · (exp(λq1·λk1) − exp(λq2·λk2) + λ_init). `mix` is a buffer in the checkpoint, 0 after conversion;",
        "raise it during fine-tuning (a linear warm-up from 0 to 1) to switch the negative branch on.",
        "",
        "## Verification (fp32, real text)",
        "",
    ]
    if not reports:
        lines.append("Not run (`--no-verify`).")
    for report in reports:
        lines += ["```", report.table(), "```", ""]
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this dir>", trust_remote_code=True)',
        'tokenizer = AutoTokenizer.from_pretrained("<this dir>")',
        "```",
        "",
        "Fine-tune with `netmorph train config.yml` or axolotl with the plugin listed in `config.yml`.",
    ]
    (directory / "README.md").write_text("\n".join(lines) + "\n")


# Full verification holds the original and the converted model in fp32 at once; above this share of the
# available memory the converter verifies layer by layer instead.
FULL_VERIFY_MEMORY_SHARE = 0.5


def use_layerwise_verify(reader: TensorReader, options: ConvertOptions, plan: list[TensorSpec]) -> bool:
    """Layer-wise when asked, or ("auto") when two fp32 models would not fit comfortably in available memory.
    Only safetensors sources can be read layer by layer (a GGUF or pickle source is in memory already)."""
    if options.verify_mode == "full" or not isinstance(reader, SafetensorsReader):
        return False
    if options.verify_mode == "layerwise":
        return True
    import psutil

    elements = sum(reader.describe(name).numel for name in reader.keys()) + sum(tensor.numel for tensor in plan)
    full_verify_bytes = 4 * elements
    return full_verify_bytes > FULL_VERIFY_MEMORY_SHARE * psutil.virtual_memory().available


def verify_conversion(source: Source, directory: Path, options: ConvertOptions, attn_implementation: str = "sdpa",
                      layerwise: bool = False):
    if layerwise:
        from netmorph.verify_layerwise import compare_layerwise

        return compare_layerwise(source.path, directory, default_texts(), tolerance=options.tolerance,
                                 attn_implementation=attn_implementation,
                                 trust_remote_code=options.trust_remote_code, progress=options.progress)
    from netmorph.modeling.modeling_netmorph_diff import NetmorphDiffForCausalLM

    converted = NetmorphDiffForCausalLM.from_pretrained(
        str(directory), dtype=torch.float32, attn_implementation=attn_implementation
    ).eval()
    original = source.load_model(attn_implementation)
    tokenizer = source.load_tokenizer()
    texts = default_texts()
    prompts = ("The quick brown fox",) if options.debug else ("The quick brown fox", "Once upon a time")
    return compare_models(original, converted, tokenizer, texts, prompts, tolerance=options.tolerance)


def convert_diff_transformer(
    source_arg: str | None, output_dir: str | Path | None, options: ConvertOptions
) -> ConversionResult:
    source = resolve_source(source_arg, allow_pickle=options.allow_pickle, trust_remote_code=options.trust_remote_code)
    if output_dir is None:
        yaml_out = (source.yaml_config or {}).get("output_dir")
        if not yaml_out:
            raise NetmorphError("no output directory: pass --output-dir DIR")
        output_dir = yaml_out
    output_dir = Path(output_dir).expanduser()
    spec = spec_for(source.config.model_type)
    check_output_dir(output_dir, options.force, source.input_paths)
    reader = source.reader()
    dtype = reader.describe(next(iter(reader.keys()))).dtype  # from the header: no tensor is read for it
    config = target_config(source.config, spec, options, dtype)
    recipe = recipe_from(options)
    # The whole conversion on meta tensors first: every output name, shape and dtype, with no data.
    plan = plan_output(lambda recorder: convert_tensors(MetaReader(reader), config, spec, recipe, recorder, options.seed))
    plan_bytes = sum(tensor.nbytes for tensor in plan)
    layerwise = (options.verify or options.debug) and use_layerwise_verify(reader, options, plan)
    log.info("converting %s (%s, %d layers) → %s", source.description, spec.model_type, config.num_hidden_layers, output_dir)

    with atomic_output_dir(output_dir) as tmp:
        with StreamingWriter(tmp, plan, parse_size(options.max_shard_size), progress=options.progress,
                             description="converting") as writer:
            convert_tensors(reader, config, spec, recipe, writer, options.seed)
            writer.finish()
        release_freed_memory()  # the verification that follows starts from what is live, not from a fragmented heap
        log.info("converted %d attention layers to differential attention (%.2f GB written)", config.num_hidden_layers,
                 plan_bytes / 1e9)
        config.save_pretrained(tmp)
        for name in MODELING_FILES:
            shutil.copy2(MODELING_DIR / name, tmp / name)
        source.save_tokenizer(tmp)
        source.save_generation_config(tmp)
        write_training_yaml(tmp, source.yaml_config, output_dir)
        reports = []
        if options.verify or options.debug:
            if layerwise:
                log.info("verifying layer by layer (--verify-mode %s)", options.verify_mode)
            report = verify_conversion(source, tmp, options, layerwise=layerwise)
            reports.append(report)
            if options.exact and not report.max_abs_logit_diff <= options.tolerance:  # NaN fails too
                raise NetmorphError(
                    f"verification failed: max |Δlogit| {report.max_abs_logit_diff:.3e} exceeds {options.tolerance:g} "
                    "in an exact mode; nothing was written (please report this as a bug)"
                )
        write_model_card(tmp, source, options, reports)
    return ConversionResult(output_dir, config, reports)
