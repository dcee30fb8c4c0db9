"""The `netmorph` command line: one click command per verb; options come from pydantic models."""

import logging
import sys
from pathlib import Path

import click

from netmorph.errors import NetmorphError
from netmorph.options import ConvertOptions, GrowOptions, click_options


class _Group(click.Group):
    """Turns a NetmorphError into one line on stderr and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except NetmorphError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="netmorph")
def main():
    """Change the architecture of a pretrained transformer LLM without losing what it learned."""


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(format="%(message)s", level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr)
    logging.getLogger("netmorph").setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("transformers", "huggingface_hub", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


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
      default          negative q/k small zero-mean normal (--negative-std)
      --zero-init      negative q/k zeros; caveat: zero q2 AND zero k2 is a saddle, neither gets a gradient
      --mirror-weights negative q/k copy the positive ones
      --lambda-start zero  λ = 0 exactly at any mix, still trainable
    Approximate modes (the measured divergence is printed and put in the model card):
      --split-heads    half the heads become the negative component (needs even head counts)
      --sublayer-norm  the paper's per-head RMSNorm before o_proj
    """
    options = ConvertOptions.build(**values)
    _setup_logging(options.debug)
    from netmorph.convert import convert_diff_transformer

    result = convert_diff_transformer(source, output_dir, options)
    click.echo(f"wrote {result.output_dir}")
    for report in result.reports:
        click.echo(report.table())


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
def verify_command(original, converted, texts, prompts, max_tokens, new_tokens, tolerance, attn_implementation,
                   as_json, trust_remote_code, allow_pickle):
    """Run ORIGINAL and CONVERTED (model dirs, .gguf files or YAML configs) on real text and compare them.

    Exit status 0 when max |Δlogit| ≤ --tolerance and every greedy generation matches, 1 otherwise.
    """
    _setup_logging(False)
    from netmorph.sources import default_texts
    from netmorph.verify import DEFAULT_PROMPTS, compare_models, load_pair

    model_a, model_b, tokenizer = load_pair(original, converted, attn_implementation, trust_remote_code, allow_pickle)
    named = {p.name: p.read_text(errors="replace") for p in texts} or default_texts()
    report = compare_models(model_a, model_b, tokenizer, named, prompts or DEFAULT_PROMPTS, max_tokens, new_tokens,
                            tolerance)
    click.echo(report.to_json() if as_json else report.table())
    sys.exit(0 if report.passed else 1)


@main.command("grow")
@click.argument("source", required=False)
@click.option("--output-dir", "-o", type=click.Path(path_type=Path), help="Where to write the grown checkpoint.")
@click_options(GrowOptions)
def grow_command(source, output_dir, **values):
    """Grow SOURCE (layers, MLP, heads, KV heads, head_dim, hidden size; any combination) so that it computes
    the same function, verify it, and write a stock checkpoint (no remote code needed).

    SOURCE is a local Hugging Face model directory, a .gguf file, or an axolotl-style YAML config. Without SOURCE
    the bundled SmolLM2-135M-Instruct is grown. Families: Llama, Mistral, Qwen2, Gemma, Phi-3, StableLM, GPT-NeoX.

    \b
    Examples:
      netmorph grow model/ -o bigger --num-layers 36 --new-layers-at interleave
      netmorph grow model/ -o wider --hidden-size 768 --num-attention-heads 12 --num-key-value-heads 4
    """
    options = GrowOptions.build(**values)
    _setup_logging(options.debug)
    from netmorph.grow import describe, grow

    result = grow(source, output_dir, options)
    click.echo(f"wrote {result.output_dir} ({describe(result.plan)})")
    for report in result.reports:
        click.echo(report.table())


if __name__ == "__main__":
    main()
