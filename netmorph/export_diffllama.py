"""`convert-diff-transformer --export diffllama`: SOURCE → a stock transformers `DiffLlamaForCausalLM` checkpoint.

It loads with no remote code at all, but it cannot be exact: DiffLlama always applies a parameter-free RMSNorm to
each differential head's output. The construction in netmorph/ops/diffllama.py keeps that norm's denominator
almost constant with a value "anchor", so the divergence is small and is measured, printed and recorded.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from netmorph.arch import ArchSpec, spec_for
from netmorph.convert import head_counts, llama_fields, read_attention, stream_attention_layers
from netmorph.errors import NetmorphError, VerificationFailed
from netmorph.io.reader import MetaReader, TensorReader
from netmorph.io.streaming import StreamingWriter, plan_output, release_freed_memory
from netmorph.io.writer import atomic_output_dir, check_output_dir
from netmorph.ops.diffllama import diffllama_attention_tensors
from netmorph.options import ConvertOptions, parse_size
from netmorph.sources import Source, default_texts, resolve_source
from netmorph.verify import DEFAULT_PROMPTS, VerifyReport, card_lines, check_tokenizer, compare_models, failure

log = logging.getLogger("netmorph")

EXPORTABLE_FAMILIES = ("llama", "mistral", "qwen2")


@dataclass
class ExportResult:
    output_dir: Path
    config: object
    reports: list[VerifyReport] = field(default_factory=list)


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


def export_tensors(reader: TensorReader, config, source_config, spec: ArchSpec, options: ConvertOptions, writer) -> None:
    """Every source tensor to the writer, each layer's attention in the DiffLlama layout (also runs on a MetaReader
    into a PlanRecorder to plan the output)."""
    heads, _, head_dim = head_counts(source_config, spec)

    def export_layer(layer_idx: int) -> dict[str, torch.Tensor]:
        attn = read_attention(reader, source_config, spec, layer_idx)  # shapes checked against the source config
        generator = torch.Generator().manual_seed(options.seed * 1_000_003 + layer_idx)
        converted = diffllama_attention_tensors(attn, layer_idx, heads, head_dim, options.diffllama_anchor,
                                                config.rms_norm_eps, options.negative_init, options.negative_std,
                                                generator)
        return {spec.attention_key(layer_idx, name): tensor for name, tensor in converted.items()}

    stream_attention_layers(reader, config, spec, writer, export_layer)


def verify_export(source: Source, directory: Path, options: ConvertOptions) -> VerifyReport:
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, attn_implementation="sdpa")
    original = source.load_model("sdpa")
    report = compare_models(original, exported.eval(), source.load_tokenizer(), default_texts(), DEFAULT_PROMPTS,
                            tolerance=options.tolerance)
    report.approximate = True
    check_tokenizer(report, source, directory)
    return report


def write_model_card(directory: Path, source: Source, options: ConvertOptions, reports: list[VerifyReport]) -> None:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [netmorph, differential-attention, diffllama]",
        "---",
        f"# DiffLlama export of `{source.description}`",
        "",
        "Written by [netmorph](https://pypi.org/project/netmorph/) `convert-diff-transformer --export diffllama`: a",
        "stock transformers `DiffLlamaForCausalLM` (no remote code). Query and KV heads are doubled (the source's heads",
        "first, new negative heads after them), λ = 0 through the λ vectors, and a value anchor of",
        f"{options.diffllama_anchor:g} keeps DiffLlama's mandatory per-head RMSNorm nearly linear.",
        "**Approximate**: the measured divergence from the source is below.",
        "",
        f"- Options: `{json.dumps({'negative_init': options.negative_init, 'diffllama_anchor': options.diffllama_anchor, 'seed': options.seed})}`",
        "",
        *card_lines(reports, exact=False),
    ]
    (directory / "README.md").write_text("\n".join(lines) + "\n")


def export_diffllama(source_arg: str | None, output_dir: str | Path | None, options: ConvertOptions) -> ExportResult:
    source = resolve_source(source_arg, allow_pickle=options.allow_pickle, trust_remote_code=options.trust_remote_code)
    if output_dir is None:
        raise NetmorphError("no output directory: pass --output-dir DIR")
    output_dir = Path(output_dir).expanduser()
    spec = spec_for(source.config.model_type)
    reader = source.reader()
    dtype = reader.describe(next(iter(reader.keys()))).dtype
    config = diffllama_config(source.config, spec, dtype)
    check_output_dir(output_dir, options.force, source.input_paths)
    plan = plan_output(lambda recorder: export_tensors(MetaReader(reader), config, source.config, spec, options, recorder))
    log.info("exporting %s (%s, %d layers) → DiffLlama %s", source.description, spec.model_type,
             config.num_hidden_layers, output_dir)
    with atomic_output_dir(output_dir) as tmp:
        with StreamingWriter(tmp, plan, parse_size(options.max_shard_size), progress=options.progress,
                             description="exporting") as writer:
            export_tensors(reader, config, source.config, spec, options, writer)
            writer.finish()
        release_freed_memory()
        config.save_pretrained(tmp)
        source.save_tokenizer(tmp)
        source.save_generation_config(tmp)
        reports = [verify_export(source, tmp, options)] if options.verify or options.debug else []
        write_model_card(tmp, source, options, reports)
    result = ExportResult(output_dir, config, reports)
    problem = failure(reports, exact=False)  # approximate: only a broken tokenizer fails it
    if problem:
        raise VerificationFailed(problem, result)
    return result
