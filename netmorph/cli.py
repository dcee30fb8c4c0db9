"""The `netmorph` command line: one click command per verb; options come from pydantic models."""

import logging
import os
import sys
from pathlib import Path

import click

from netmorph.errors import NetmorphError, VerificationFailed
from netmorph.options import ConvertOptions, GrowOptions, QkvLayoutOptions, click_options


class _Group(click.Group):
    """Turns a NetmorphError, or a flag click cannot parse, into one line on stderr and exit status 2."""

    def invoke(self, ctx):
        """Override of click.Group.invoke: runs the command; VerificationFailed → its reports and a last line
        `FAILED: …`, exit 1; NetmorphError, an unknown (or renamed) flag or another usage error → one line `error: …`
        on stderr, exit 2."""
        try:
            return super().invoke(ctx)
        except VerificationFailed as e:  # an exact mode's proof failed: the reports, then FAILED as the last line
            _print_result(e.result)
            click.echo(f"{e.result.output_dir} is kept for the bug report; its README.md says what failed")
            click.echo(f"FAILED: {e}")
            sys.exit(1)
        except NetmorphError as e:
            _fail(str(e))
        except click.NoSuchOption as e:
            if e.option_name in RENAMED_FLAGS:
                _fail(f"{e.option_name} was replaced by {RENAMED_FLAGS[e.option_name]}")
            command = f"{ctx.command_path} {ctx.invoked_subcommand or ''}".strip()
            _fail(f"{e.format_message()} (see `{command} --help`)")
        except click.UsageError as e:
            command = f"{ctx.command_path} {ctx.invoked_subcommand or ''}".strip()
            _fail(f"{e.format_message()} (see `{command} --help`)")
        except OSError as e:  # a path the user gave that the file system refuses (a file where a folder goes, ...)
            where = f"{e.filename}: " if e.filename else ""
            _fail(f"{where}{e.strerror or type(e).__name__}: choose another path")


RENAMED_FLAGS = {"--zero-init": "--negative-init zero", "--mirror-weights": "--negative-init mirror",
                 "--no-zero-init": "--negative-init normal", "--no-mirror-weights": "--negative-init normal"}


LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # everything str.splitlines() splits on


def _fail(message: str):
    """One line on stderr, even when a path or value in the message holds a line break; exit status 2."""
    escaped = "".join(c.encode("unicode_escape").decode() if c in LINE_BREAKS else c for c in message)
    click.echo(f"error: {escaped}", err=True)
    sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="netmorph")
def main():
    """Change the architecture of a pretrained transformer LLM without losing what it learned."""


def _print_result(result) -> None:
    """What a checkpoint-writing command prints: where it wrote what, then each verification report."""
    summary = result.surgery.summary()
    click.echo(f"wrote {result.output_dir}" + (f" ({summary})" if summary else ""))
    for report in result.reports:
        click.echo(report.table())


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(format="%(message)s", level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr)
    logging.getLogger("netmorph").setLevel(logging.DEBUG if debug else logging.INFO)
    # torchao (the `probes` extra; transformers imports it whenever it is installed) logs a warning for each compiled
    # extension its wheel holds for another Python or for CUDA, and torch logs deprecations of its registrations.
    for noisy in ("transformers", "huggingface_hub", "urllib3", "torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # keeps stderr to netmorph's lines (and one line on error)


@main.command("convert-diff-transformer")
@click.argument("source", required=False)
@click.option("--output-dir", "-o", type=click.Path(path_type=Path), help="Where to write the converted checkpoint.")
@click_options(ConvertOptions)
def convert_diff_transformer_command(source, output_dir, **values):
    """Convert SOURCE's attention to differential attention, verify it, and write a checkpoint.

    SOURCE is a local Hugging Face model directory, a .gguf file, or an axolotl-style YAML config (base_model,
    output_dir, diff_attn_* keys). Without SOURCE the bundled SmolLM2-135M-Instruct is converted.

    \b
    Exact modes (the converted model computes the original function; mix = 0 after conversion):
      default          negative q/k small zero-mean normal (--negative-init normal, --negative-std)
      --negative-init zero    negative q/k zeros; caveat: zero q2 AND zero k2 is a saddle, neither gets a gradient
      --negative-init mirror  negative q/k copy the positive ones
      --lambda-start zero  λ = 0 exactly at any mix, still trainable
      --variant v2     DIFF V2: paired query heads, per-token λ = sigmoid(lambda_proj(x)) (bitwise exact)
    Approximate modes (the measured divergence is printed and put in the model card):
      --split-heads    half the heads become the negative component (needs even head counts)
      --sublayer-norm  the paper's per-head RMSNorm before o_proj
      --export diffllama  a stock transformers DiffLlama checkpoint (no remote code)
    """
    options = ConvertOptions.build(**values)
    _setup_logging(options.debug)
    from netmorph.surgery.diff import convert_diff_transformer

    _print_result(convert_diff_transformer(source, output_dir, options))


@main.command("verify")
@click.argument("original")
@click.argument("converted")
@click.option("--text", "texts", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text file to compare on (repeatable). Default: two license texts from /usr/share/common-licenses.")
@click.option("--prompt", "prompts", multiple=True, help="Prompt for the greedy-generation check (repeatable).")
@click.option("--max-tokens", default=512, show_default=True, help="Tokens of each text to run.")
@click.option("--new-tokens", default=32, show_default=True, help="Greedy tokens generated per prompt.")
@click.option("--tolerance", default=1e-4, show_default=True, help="Max |Δlogit| (fp32) that passes.")
@click.option("--attn-implementation", type=click.Choice(["eager", "sdpa", "flex_attention"]), default="sdpa",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--trust-remote-code", is_flag=True, help="Allow checkpoints that need their own model code.")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin/.pt weights (loaded with weights_only=True).")
@click.option("--layerwise", is_flag=True,
              help="One decoder layer of each model in memory at a time (models larger than RAM; safetensors model "
                   "dirs of the same depth): per-layer max |Δ| and final logits; top-1 agreement replaces generation.")
def verify_command(original, converted, texts, prompts, max_tokens, new_tokens, tolerance, attn_implementation,
                   as_json, trust_remote_code, allow_pickle, layerwise):
    """Run ORIGINAL and CONVERTED (model dirs, .gguf files or YAML configs) on real text and compare them.

    Exit status 0 when max |Δlogit| ≤ --tolerance and every greedy generation matches (with --layerwise: every
    top-1 token matches), 1 otherwise.
    """
    _setup_logging(False)
    from netmorph.sources import default_texts
    from netmorph.verify.compare import DEFAULT_PROMPTS, compare_models, load_pair

    named = _read_texts(texts) or default_texts()
    if layerwise:
        from netmorph.verify.layerwise import compare_layerwise

        report = compare_layerwise(original, converted, named, max_tokens, tolerance, attn_implementation,
                                   trust_remote_code, progress=not as_json)
        click.echo(report.to_json() if as_json else report.table())
        sys.exit(0 if report.passed else 1)
    model_a, model_b, tokenizer = load_pair(original, converted, attn_implementation, trust_remote_code, allow_pickle)
    report = compare_models(model_a, model_b, tokenizer, named, prompts or DEFAULT_PROMPTS, max_tokens, new_tokens,
                            tolerance)
    click.echo(report.to_json() if as_json else report.table())
    sys.exit(0 if report.passed else 1)


@main.command("train")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--max-steps", type=click.IntRange(min=1), help="Override max_steps of the YAML.")
@click.option("--output-dir", "-o", help="Override output_dir of the YAML.")
@click.option("--resume/--no-resume", default=None,
              help="Resume from the newest checkpoint in output_dir (default: the YAML's resume_from_checkpoint).")
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs).")
def train_command(config, max_steps, output_dir, resume, no_progress):
    """Fine-tune the model of an axolotl-style CONFIG YAML (the config.yml the converter writes works as is).

    Reads base_model, datasets / test_datasets (local .txt, .jsonl, .parquet), sequence_len, micro_batch_size,
    gradient_accumulation_steps, max_steps / num_epochs, learning_rate, output_dir, report_to, save_steps and the
    diff_attn_* keys: diff_attn_warmup_steps (mix 0 → 1; unset: 1), diff_attn_log_every (unset: no metrics),
    diff_attn_num_monitor_layers. Runs on the Hugging Face Trainer: `accelerate launch -m netmorph.cli train CONFIG`
    trains on several processes (DDP; FSDP2 with the YAML's fsdp_config, DeepSpeed with its deepspeed key).
    """
    _setup_logging(False)
    from netmorph.train.run import train

    result = train(config, max_steps=max_steps, output_dir=output_dir, resume=resume, progress=not no_progress)
    if not result.main_process:
        return  # one report for a multi-process run
    eval_part = f", eval loss {result.eval_loss:.5f}" if result.eval_loss is not None else ""
    mix_part = f", mix {result.final_mix:g}" if result.final_mix is not None else ""
    click.echo(f"wrote {result.output_dir}: {result.global_step} steps, train loss {result.train_loss:.5f}"
               f"{eval_part}{mix_part}")


@main.command("consolidate")
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--output-dir", "-o", required=True, type=click.Path(path_type=Path), help="Where to write the checkpoint.")
@click.option("--allow-pickle", is_flag=True,
              help="Load the checkpoint's .metadata, a pickle (torch.distributed.checkpoint's format): only for a "
                   "checkpoint you trust.")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
def consolidate_command(config, checkpoint, output_dir, allow_pickle, force):
    """Merge the sharded FSDP model of CHECKPOINT (a checkpoint-N folder of `netmorph train CONFIG` run with
    fsdp_config.state_dict_type SHARDED_STATE_DICT) into a normal safetensors checkpoint with config, tokenizer and
    modeling code (loadable with trust_remote_code=True; `netmorph verify` compares it with another model).
    """
    _setup_logging(False)
    from netmorph.train.consolidate import consolidate

    click.echo(f"wrote {consolidate(config, checkpoint, output_dir, allow_pickle=allow_pickle, force=force)}")


@main.command("evaluate")
@click.argument("model")
@click.option("--compare", help="A second model (e.g. the original) evaluated on the same tokens.")
@click.option("--dataset", required=True, type=click.Path(path_type=Path),
              help="Local .txt, .jsonl or .parquet file (field --field).")
@click.option("--field", default="text", show_default=True, help="JSONL/parquet field holding the text.")
@click.option("--sequence-len", default=512, show_default=True, help="Tokens per evaluated block.")
@click.option("--max-blocks", type=int, help="Evaluate at most this many blocks.")
@click.option("--batch-size", default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--trust-remote-code", is_flag=True, help="Allow checkpoints that need their own model code.")
def evaluate_command(model, compare, dataset, field, sequence_len, max_blocks, batch_size, as_json, trust_remote_code):
    """Loss and perplexity of MODEL (model dir, .gguf or training YAML) on a dataset, or of MODEL and --compare
    side by side on the same token blocks."""
    _setup_logging(False)
    from netmorph.train.run import evaluate, results_json, results_table

    results = evaluate(model, str(dataset), compare, sequence_len, max_blocks, field, batch_size, trust_remote_code)
    click.echo(results_json(results) if as_json else results_table(results))


@main.command("probe")
@click.argument("model", required=False)
@click.option("--compare", help="A second model (e.g. the original) probed on the same tokens.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("probe-output"), show_default=True,
              help="Directory for probe.json and probe.png.")
@click.option("--text", "texts", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Real text to probe on (repeatable). Default: license texts from /usr/share/common-licenses.")
@click.option("--probes", default="outliers,retrieval,quantization", show_default=True,
              help="Comma-separated subset of outliers, retrieval, quantization.")
@click.option("--sequence-len", default=256, show_default=True, help="Tokens per block (outliers, quantization).")
@click.option("--max-blocks", default=4, show_default=True, help="Blocks of text (outliers, quantization).")
@click.option("--lengths", default="256,512,1024", show_default=True,
              help="Retrieval context lengths in tokens (clipped to the model's context).")
@click.option("--depths", default="0.1,0.5,0.9", show_default=True, help="Depths of the asked needle (0..1).")
@click.option("--needles", default=3, show_default=True, help="Needles per context (one is asked).")
@click.option("--seed", default=0, show_default=True, help="Seed of the needles' cities and numbers.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of tables.")
@click.option("--trust-remote-code", is_flag=True, help="Allow checkpoints that need their own model code.")
def probe_command(model, compare, out_dir, texts, probes, sequence_len, max_blocks, lengths, depths, needles, seed,
                  as_json, trust_remote_code):
    """Activation outliers, attention noise in multi-needle retrieval, and quantization robustness of MODEL (model
    dir, .gguf or training YAML; without MODEL the bundled SmolLM2-135M-Instruct), and of --compare on the same tokens.

    Writes OUT/probe.json and OUT/probe.png and prints the tables (see README, "Does it help? netmorph probe").
    """
    settings = _probe_settings(texts, probes, sequence_len, max_blocks, lengths, depths, needles, seed)
    _setup_logging(False)
    from netmorph.plot import plot_probes
    from netmorph.probes import probe

    report = probe(model, compare, settings, trust_remote_code)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Both files are written beside their final names and renamed only once both exist: a failure (disk full, a
    # plotting error, Ctrl-C) leaves the folder's earlier probe.json/probe.png, never a new one without the other.
    json_tmp, png_tmp = out_dir / f".probe.json.{os.getpid()}.tmp", out_dir / f".probe.{os.getpid()}.tmp.png"
    try:
        json_tmp.write_text(report.to_json())
        plot_probes(report, png_tmp)
        os.replace(json_tmp, out_dir / "probe.json")
        os.replace(png_tmp, png := out_dir / "probe.png")
    finally:
        json_tmp.unlink(missing_ok=True)
        png_tmp.unlink(missing_ok=True)
    click.echo(report.to_json() if as_json else report.table())
    if not as_json:
        click.echo(f"wrote {out_dir / 'probe.json'} and {png}")


def _read_texts(paths) -> dict[str, str]:
    """{file name: text} of each --text FILE. Raises NetmorphError for a file that is not UTF-8 text (a model file
    or an archive passed by mistake would otherwise be measured as text of replacement characters)."""
    texts = {}
    for path in paths:
        try:
            texts[path.name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise NetmorphError(f"--text {path} is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}): "
                                "pass a plain-text file") from None
        if not texts[path.name].strip():
            raise NetmorphError(f"--text {path} is empty: pass a file with text in it")
    return texts


def _probe_settings(texts, probes, sequence_len, max_blocks, lengths, depths, needles, seed):
    from netmorph.probes import PROBES, ProbeSettings

    def numbers(text: str, kind, flag: str):
        try:
            return tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise NetmorphError(f"{flag} {text!r} is not a comma-separated list of numbers (example: {flag} 256,512)")

    chosen = tuple(p.strip() for p in probes.split(",") if p.strip())
    unknown = [p for p in chosen if p not in PROBES]
    if unknown or not chosen:
        raise NetmorphError(f"unknown probe {unknown[0] if unknown else probes!r}: choose from {', '.join(PROBES)}")
    depth_values = numbers(depths, float, "--depths")
    if any(not 0 <= d <= 1 for d in depth_values):
        raise NetmorphError(f"--depths {depths}: every depth must be between 0 and 1")
    if sequence_len < 2 or max_blocks < 1 or needles < 1:
        raise NetmorphError("--sequence-len must be at least 2, --max-blocks and --needles at least 1")
    return ProbeSettings(texts=_read_texts(texts), probes=chosen,
                         sequence_len=sequence_len, max_blocks=max_blocks,
                         lengths=numbers(lengths, int, "--lengths"), depths=depth_values, needles=needles, seed=seed)


@main.group("plot", cls=_Group)
def plot_group():
    """PNG figures: training curves of runs, attention maps of a layer."""


@plot_group.command("training")
@click.argument("runs", nargs=-1, required=True)
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="PNG file to write.")
def plot_training_command(runs, output):
    """Loss, λ/mix and attention entropy curves of one or more RUNS (output_dir of `netmorph train`), overlaid."""
    from netmorph.plot import plot_training

    click.echo(f"wrote {plot_training(list(runs), output)}")


@plot_group.command("attention")
@click.argument("model")
@click.option("--prompt", default="The quick brown fox jumps over the lazy dog because it wanted to see the river.",
              show_default=True)
@click.option("--layer", default=0, show_default=True, help="Decoder layer (0-based).")
@click.option("--head", type=int, help="One attention head (default: mean over heads).")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="PNG file to write.")
@click.option("--trust-remote-code", is_flag=True, help="Allow checkpoints that need their own model code.")
def plot_attention_command(model, prompt, layer, head, output, trust_remote_code):
    """Positive, negative and differential attention maps of MODEL (a differential-attention checkpoint) for a
    prompt on one layer — the paper's noise-cancellation picture."""
    import netmorph.auto  # noqa: F401  (registers the differential-attention classes with the Auto classes)
    from netmorph.plot import plot_attention
    from netmorph.sources import resolve_source

    source = resolve_source(model, trust_remote_code=trust_remote_code)
    path = plot_attention(source.load_model("sdpa"), source.load_tokenizer(), prompt, layer, head, output)
    click.echo(f"wrote {path}")


@main.command("grow")
@click.argument("source", required=False)
@click.option("--output-dir", "-o", type=click.Path(path_type=Path), help="Where to write the grown checkpoint.")
@click_options(GrowOptions)
def grow_command(source, output_dir, **values):
    """Grow SOURCE (layers, MLP, heads, KV heads, head_dim, hidden size; any combination) so that it computes
    the same function, verify it, and write a stock checkpoint (no remote code needed).

    SOURCE is a local Hugging Face model directory, a .gguf file, or an axolotl-style YAML config. Without SOURCE
    the bundled SmolLM2-135M-Instruct is grown. Families: Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, StableLM,
    GPT-NeoX, GPT-2, Falcon, OLMo2/3, Mixtral, Qwen3-MoE, GPT-OSS, SmolLM3, Granite, Ministral (what each grows:
    README, "grow").

    \b
    Examples:
      netmorph grow model/ -o bigger --num-layers 36 --new-layers-at interleave
      netmorph grow model/ -o wider --hidden-size 768 --num-attention-heads 12 --num-key-value-heads 4
    """
    options = GrowOptions.build(**values)
    _setup_logging(options.debug)
    from netmorph.surgery.grow import grow

    _print_result(grow(source, output_dir, options))


@main.command("qkv-layout")
@click.argument("source", required=False)
@click.option("--output-dir", "-o", type=click.Path(path_type=Path), help="Where to write the converted checkpoint.")
@click_options(QkvLayoutOptions)
def qkv_layout_command(source, output_dir, **values):
    """Store SOURCE's q/k/v projections (weights and biases) in another layout, bit-exactly, and write a checkpoint.

    SOURCE is a local Hugging Face model directory, a .gguf file, or an axolotl-style YAML config; without SOURCE
    the bundled SmolLM2-135M-Instruct is used. A layout change is a row permutation: nothing is rounded.

    \b
    Layouts: separate   q_proj / k_proj / v_proj (Llama, Mistral, Qwen2/3, Gemma, StableLM, OLMo2/3, Mixtral, ...)
             sequential [Q|K|V] (Phi-3 qkv_proj; GPT-2 c_attn, stored transposed)
             interleaved per head [q,k,v] (GPT-NeoX; only when KV heads = query heads)
             grouped    per KV group [q..q,k,v] (Falcon; multi_query is one group)
    Llama/Mistral --to sequential writes a stock Phi-3 checkpoint and Phi-3 --to separate a stock Llama (or
    Mistral) one when the configs agree. A layout no stock class reads (GPT-NeoX --to sequential, ...) needs
    --allow-non-stock; converting it back to the family's layout gives the original bits.
    """
    options = QkvLayoutOptions.build(**values)
    _setup_logging(options.debug)
    from netmorph.surgery.qkv_layout import convert_qkv_layout

    _print_result(convert_qkv_layout(source, output_dir, options))


if __name__ == "__main__":
    main()
