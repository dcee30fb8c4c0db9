"""CPU benchmark: differential-attention SmolLM2-135M (converted by netmorph: V1, the paper's layout with doubled q/k
heads, and DIFF V2) vs the original, in one run.

Measures forward+backward at 512 tokens and greedy decode of 64 tokens (KV cache), interleaving the two models
so drift hits both, and prints each ratio next to its FLOP-ideal ratio computed from the shapes. Appends the table
to BENCHMARKS.md with date, machine and versions.

    .venv/bin/python benchmarks/cpu_diff_attention.py [--repeats 5] [--no-write]
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from benchmarks_md import write_section  # noqa: E402

from netmorph.surgery.diff import convert_diff_transformer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import netmorph.auto  # noqa: E402,F401  (converted checkpoints load with the Auto classes)
from netmorph.options import ConvertOptions  # noqa: E402
from netmorph.sources import default_texts, resolve_source  # noqa: E402


def flops_per_token(config, context: int, variant: str) -> float:
    """Matmul FLOPs of one token through the model with `context` keys (math attention: full rows). variant:
    "original"; "v1" (2H query and 2G key heads, two attention calls); "v2" (2H query heads over the G KV heads in
    one call, plus lambda_proj D → H)."""
    D, H, G, d, I, V = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                        config.head_dim, config.intermediate_size, config.vocab_size)
    q_factor = 1 if variant == "original" else 2
    k_factor = 2 if variant == "v1" else 1
    projections = D * (q_factor * H * d + k_factor * G * d + G * d + H * d) + 3 * D * I
    projections += D * H if variant == "v2" else 0
    attention = q_factor * 2 * H * d * context  # scores + weighted sum, per query head
    return 2 * (config.num_hidden_layers * (projections + attention) + D * V)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-write", action="store_true", help="Print only; do not append to BENCHMARKS.md.")
    args = parser.parse_args()

    source = resolve_source(None)
    original = source.load_model("sdpa")
    tokenizer = source.load_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        models = {"original": original}
        for variant in ("v1", "v2"):
            convert_diff_transformer(None, Path(tmp) / variant, ConvertOptions(verify=False, variant=variant))
            models[variant] = AutoModelForCausalLM.from_pretrained(Path(tmp) / variant, dtype=torch.float32,
                                                                      attn_implementation="sdpa")
    ids = tokenizer(next(iter(default_texts().values())), return_tensors="pt").input_ids[:, : args.tokens]
    prompt = tokenizer("The quick brown fox", return_tensors="pt").input_ids

    def train_step(model):
        model.train()
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    def decode(model):
        model.eval()
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                           max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           pad_token_id=tokenizer.eos_token_id)

    results = {}
    for label, step in (("forward+backward", train_step), ("greedy decode", decode)):
        for model in models.values():
            step(model)  # warm-up
        times = {name: [] for name in models}
        for _ in range(args.repeats):  # interleaved: each repeat runs both models back to back
            for name, model in models.items():
                start = time.perf_counter()
                step(model)
                times[name].append(time.perf_counter() - start)
        results[label] = {name: statistics.median(values) for name, values in times.items()}

    config = original.config
    mean_context = prompt.shape[1] + args.new_tokens / 2

    def ideal(variant: str, context: float) -> float:
        return flops_per_token(config, context, variant) / flops_per_token(config, context, "original")

    rows = [
        (f"forward+backward, {args.tokens} tokens", results["forward+backward"], args.tokens),
        (f"greedy decode, {args.new_tokens} tokens", results["greedy decode"], mean_context),
    ]
    header = ("| measurement | original (s) | V1 (s) | V1/original | V1 FLOP-ideal | V2 (s) | V2/original | "
              "V2 FLOP-ideal |\n|---|---|---|---|---|---|---|---|")
    lines = [header] + [
        f"| {name} | {r['original']:.3f} | {r['v1']:.3f} | {r['v1'] / r['original']:.3f} | {ideal('v1', ctx):.3f} "
        f"| {r['v2']:.3f} | {r['v2'] / r['original']:.3f} | {ideal('v2', ctx):.3f} |"
        for name, r, ctx in rows
    ]
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    command = "python benchmarks/cpu_diff_attention.py " + " ".join(sys.argv[1:])
    section = (
        "\n## CPU: differential-attention SmolLM2-135M (V1 and DIFF V2) vs original "
        f"({datetime.date.today().isoformat()})\n\n"
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, Python {platform.python_version()}; "
        f"fp32, SDPA; V1 = default conversion (doubled heads, two attention calls, mix = 0), V2 = `--variant v2` "
        f"(2H query heads, one call); median of {args.repeats} interleaved repeats.\n"
        f"Command: `{command.strip()}`\n\n{table}\n"
    )
    print(f"appended to {write_section(section)}")


if __name__ == "__main__":
    main()
