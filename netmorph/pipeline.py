"""The path every checkpoint-writing command takes; a surgery (netmorph/surgery/) supplies only what differs.

    SOURCE ─► resolve (HF dir | .gguf | YAML | bundled) ─► surgery: checks, target config, plan (no tensor read)
           ─► the surgery's tensor loop on meta tensors: the output manifest (every name, shape and dtype)
           ─► the same loop for real into a StreamingWriter, inside an atomic output dir (temp dir → rename)
           ─► config, tokenizer and other non-weight files, the surgery's own files (modeling code, config.yml)
           ─► verification: the surgery's bit-level checks, then both models on real text — whole, or one decoder
              layer at a time (`--verify-mode`, auto by memory) — and the output's tokenizer
           ─► one model card (huggingface_hub.ModelCard: base_model lineage, the verification table)
           ─► one pass rule: an exact surgery fails on logits over the tolerance or differing generations (the
              checkpoint stays, its card and the last line say FAILED, exit 1); an approximate one reports.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from netmorph.errors import NetmorphError, VerificationFailed
from netmorph.io.reader import MetaReader, SafetensorsReader, TensorInfo, TensorReader
from netmorph.io.streaming import StreamingWriter, record_manifest, release_freed_memory
from netmorph.io.writer import atomic_output_dir, check_output_dir
from netmorph.sources import Source, default_texts, resolve_source
from netmorph.verify.compare import DEFAULT_PROMPTS, card_lines, check_tokenizer, compare_models, failure

log = logging.getLogger("netmorph")


@dataclass
class Card:
    """What a surgery says in its model card: a title, lines under it, and how to load the output."""

    title: str
    lines: list[str]
    remote_code: bool = False


class Surgery:
    """One command's change of a checkpoint. The pipeline (`run`) calls, in order: the constructor (checks and
    planning from the source config alone; sets `config`), `stream_meta` and `stream` (the tensor loop), `write_files`,
    `bit_checks`, the verification hooks and `card`. Subclasses set the class attributes and override what they
    need; see netmorph/surgery/ for the three surgeries."""

    command: str = ""  # the CLI verb, in messages and the model card
    verb: str = "writing"  # the progress bar's word
    tags: tuple[str, ...] = ()  # model card tags after "netmorph"
    reads_any_qkv_layout: bool = False  # takes a source in a layout no stock class reads (qkv-layout itself)

    def __init__(self, source: Source, options):
        self.source, self.options = source, options
        self.config = None  # the output's config (PretrainedConfig), set by the subclass

    # ── what differs ──
    @property
    def exact(self) -> bool:
        """The output computes the source's function (its proof must pass), or approximately (its divergence is
        measured and reported)."""
        return True

    def stream(self, reader: TensorReader, writer) -> None:
        """Every output tensor to `writer.add(name, tensor)` (a StreamingWriter, or a ManifestRecorder on meta tensors)."""
        raise NotImplementedError

    def stream_meta(self, reader: TensorReader, recorder) -> None:
        """The tensor loop on meta tensors, recording the output manifest."""
        self.stream(MetaReader(reader), recorder)

    def write_files(self, directory: Path, output_dir: Path) -> None:
        """Files of the output besides weights, config, tokenizer and generation config (the final path is
        `output_dir`; `directory` is where they are written now)."""

    def bit_checks(self, reader: TensorReader, directory: Path) -> list[str]:
        """Checks of the written tensors themselves; returns what failed (empty: nothing)."""
        return []

    @property
    def verifiable(self) -> bool:
        """Whether both models can run (a layout no stock class reads cannot)."""
        return True

    def layerwise_refusal(self) -> str | None:
        """Why layer-wise verification cannot compare these two models (None: it can)."""
        return None

    verify_dtype: torch.dtype = torch.float32
    source_backend: str = "sdpa"  # the attention backend each model runs on in the verification
    output_backend: str = "sdpa"

    def load_output(self, directory: Path, dtype: torch.dtype):
        """The written model, fresh from disk, in `dtype` on `output_backend`."""
        from transformers import AutoModelForCausalLM

        import netmorph.auto  # noqa: F401  (a differential checkpoint loads with its classes)

        return AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype,
                                                    attn_implementation=self.output_backend).eval()

    def tolerance(self, original, tokenizer, texts: dict[str, str], dtype: torch.dtype) -> tuple[float, str]:
        """(max |Δlogit| that passes, where it comes from when it is not --tolerance)."""
        return self.options.tolerance, ""

    def card(self) -> Card:
        """The model card section this surgery writes (title, lines, whether loading needs remote code); every
        subclass implements it."""
        raise NotImplementedError

    def summary(self) -> str:
        """What the CLI prints after "wrote DIR": what changed."""
        return ""


@dataclass
class Result:
    """What `run` returns: the output directory, the output config, the surgery, the verification reports
    (VerifyReport or LayerwiseReport; empty when not verified) and the problems of the bit-level checks."""

    output_dir: Path
    config: object
    surgery: Surgery
    reports: list = field(default_factory=list)  # VerifyReport, or LayerwiseReport when verified layer by layer
    problems: list[str] = field(default_factory=list)  # what the surgery's bit-level checks found

    @property
    def plan(self):
        """The surgery's own plan (GrowthPlan, LayoutPlan), when it has one."""
        return getattr(self.surgery, "plan", None)


def check_full_precision(source: Source) -> None:
    """Refuse a safetensors checkpoint quantized by transformers (config `quantization_config`: GPT-OSS's MXFP4
    experts, AWQ, GPTQ, bitsandbytes): its stored tensors are packed blocks and scales, not the weights the
    surgeries rewrite (a GGUF source is dequantized on load and passes)."""
    quantization = getattr(source.config, "quantization_config", None)
    if quantization is None or source.kind == "gguf":
        return
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization,
                                                                                            "quant_method", None)
    raise NetmorphError(
        f"{source.path} is quantized (quantization_config quant_method {str(method)!r}): netmorph rewrites "
        "full-precision weights; dequantize it first (load it with transformers' dequantize option and "
        "save_pretrained) and run on that copy"
    )


def output_directory(output_dir: str | Path | None, source: Source) -> Path:
    """--output-dir, else the YAML source's `output_dir`; one-line error when neither is given."""
    if output_dir is None:
        output_dir = (source.yaml_config or {}).get("output_dir")
        if not output_dir:
            raise NetmorphError("no output directory: pass --output-dir DIR")
    return Path(output_dir).expanduser()


def run(surgery_class: type[Surgery], source_arg: str | Path | None, output_dir: str | Path | None, options) -> Result:
    """SOURCE → the surgery's checkpoint at `output_dir`, verified (see the module docstring). Raises NetmorphError
    (bad input: nothing written) or VerificationFailed (an exact surgery's proof failed: the checkpoint is kept)."""
    source = resolve_source(source_arg, allow_pickle=options.allow_pickle, trust_remote_code=options.trust_remote_code,
                            any_qkv_layout=surgery_class.reads_any_qkv_layout)
    output_dir = output_directory(output_dir, source)
    check_full_precision(source)
    surgery = surgery_class(source, options)
    check_output_dir(output_dir, options.force, source.input_paths)
    reader = source.reader()
    manifest = record_manifest(lambda recorder: surgery.stream_meta(reader, recorder))
    verifying = (options.verify or options.debug) and surgery.verifiable
    layerwise = verifying and verify_layer_by_layer(surgery, reader, manifest)
    log.info("%s %s (%s) → %s%s", surgery.command, source.description, source.config.model_type, output_dir,
             f": {surgery.summary()}" if surgery.summary() else "")
    result = Result(output_dir, surgery.config, surgery)
    with atomic_output_dir(output_dir) as tmp:
        with StreamingWriter(tmp, manifest, options.max_shard_bytes, progress=options.progress,
                             description=surgery.verb) as writer:
            surgery.stream(reader, writer)
            writer.finish()
        release_freed_memory()  # the verification that follows starts from what is live, not a fragmented heap
        surgery.config.save_pretrained(tmp)
        source.save_tokenizer(tmp)
        source.save_generation_config(tmp)
        surgery.write_files(tmp, output_dir)
        if options.verify or options.debug:
            result.problems = surgery.bit_checks(reader, tmp)
        if verifying:
            result.reports.append(verify(surgery, tmp, layerwise))
        write_model_card(tmp, surgery, result)
    problem = "; ".join(filter(None, [*result.problems, failure(result.reports, surgery.exact)]))
    if problem:  # the checkpoint stays (its card says FAILED) for the bug report; the command fails
        raise VerificationFailed(problem, result)
    return result


# ── verification: one policy, one comparison ─────────────────────────────────────────────────────────────────────


def verify_layer_by_layer(surgery: Surgery, reader: TensorReader, manifest: list[TensorInfo]) -> bool:
    """--verify-mode: "full" (both whole models), "layerwise" (one decoder layer of each at a time: models larger
    than memory), or "auto" — layer-wise when two fp32 copies would not fit comfortably in available memory.
    Layer-wise needs safetensors weights (a GGUF or pickle source is in memory already) and two models a layer of
    one can be compared with a layer of the other."""
    from netmorph.verify.layerwise import whole_models_fit

    mode = surgery.options.verify_mode
    if mode == "full":
        return False
    refusal = surgery.layerwise_refusal() or (
        None if isinstance(reader, SafetensorsReader) else "its source is not a safetensors model directory")
    if mode == "layerwise" and refusal:
        raise NetmorphError(f"--verify-mode layerwise cannot verify this {surgery.command}: {refusal}; "
                            "use --verify-mode full")
    if refusal:
        return False
    return mode == "layerwise" or not whole_models_fit(reader, sum(tensor.numel for tensor in manifest))


def experts_runnable_in(model, dtype: torch.dtype) -> None:
    """transformers' default mixture-of-experts kernel (`grouped_mm`, Mixtral, Qwen3-MoE, GPT-OSS) has no float64
    path: for a float64 run the model's experts switch to their eager loop (the same sums, expert by expert)."""
    if dtype == torch.float64 and getattr(model.config, "_experts_implementation", None) not in (None, "eager"):
        model.set_experts_implementation("eager")


def verify(surgery: Surgery, directory: Path, layerwise: bool):
    """The source and the written model on real text (whole or layer by layer), and the written tokenizer."""
    source, options = surgery.source, surgery.options
    if layerwise:
        from netmorph.verify.layerwise import compare_layerwise

        log.info("verifying layer by layer (--verify-mode %s)", options.verify_mode)
        report = compare_layerwise(source.path, directory, default_texts(), tolerance=options.tolerance,
                                   attn_implementation=surgery.output_backend,
                                   trust_remote_code=options.trust_remote_code, progress=options.progress)
    else:
        dtype = surgery.verify_dtype
        output = surgery.load_output(directory, dtype)
        original = source.load_model(surgery.source_backend)
        tokenizer, texts = source.load_tokenizer(), default_texts()
        try:
            tolerance, basis = surgery.tolerance(original, tokenizer, texts, dtype)
            original.to(dtype)  # float32 → float64 → float32 is lossless: the cached source comes back unchanged
            for model in (original, output):
                experts_runnable_in(model, dtype)
            report = compare_models(original, output, tokenizer, texts, DEFAULT_PROMPTS, tolerance=tolerance)
        finally:
            original.to(torch.float32)
        report.tolerance_basis, report.generations_required = basis, not basis
        report.approximate = not surgery.exact
    check_tokenizer(report, source, directory)
    return report


# ── the model card ───────────────────────────────────────────────────────────────────────────────────────────────


def write_model_card(directory: Path, surgery: Surgery, result: Result) -> None:
    """README.md with the Hugging Face card metadata (library, base_model lineage, tags), the surgery's account,
    its options, exactness, the verification tables and how to load it."""
    from huggingface_hub import ModelCard, ModelCardData

    source, card = surgery.source, surgery.card()
    flags = {k: v for k, v in surgery.options.model_dump().items()
             if v is not None and k not in ("force", "debug", "verify", "verify_mode", "progress")}
    exactness = ("**Exact**: the new model computes the source model's function; the verification below is its proof."
                 if surgery.exact else
                 "**Approximate**: this changes the function; fine-tune to recover. The measured divergence is below.")
    data = ModelCardData(library_name="transformers", base_model=source.description, tags=["netmorph", *surgery.tags])
    lines = [
        f"# {card.title}", "",
        f"Made by [netmorph](https://pypi.org/project/netmorph/) `{surgery.command}`.", "",
        f"- Source: `{source.description}` (model_type `{source.config.model_type}`)",
        f"- Options: `{json.dumps(flags, default=str)}`",
        f"- {exactness}",
        *card.lines, "",
    ]
    lines += [f"**Verification FAILED**: {problem}. Please report it with this card." for problem in result.problems]
    if result.reports:
        lines += card_lines(result.reports, surgery.exact)
    elif not (surgery.options.verify or surgery.options.debug):
        lines += ["## Verification", "", "Not run (`--no-verify`).", ""]
    else:  # a layout no stock class reads: the bit-level checks (in the surgery's lines above) are the verification
        lines += ["## Verification", "", "No stock transformers class reads this layout, so the two models cannot be "
                  "run side by side: the bit-level checks above are the verification.", ""]
    load = ('AutoModelForCausalLM.from_pretrained("<this dir>", trust_remote_code=True)' if card.remote_code
            else 'AutoModelForCausalLM.from_pretrained("<this dir>")')
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f"model = {load}", 'tokenizer = AutoTokenizer.from_pretrained("<this dir>")', "```"]
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n").save(directory / "README.md")
