"""GPU benchmark (issues 3 and 7): netmorph's differential attention vs the original at the anchor shapes of
../shared/bench/anchor_attn.py — hidden 2048, 32 query / 8 KV heads, head_dim 64, 4 layers, T = 4096, bf16, SDPA.

All in one run, each ratio next to its FLOP-ideal ratio computed from the shapes:
- training step (forward + backward, batch 2 × 4096) of V1 (doubled heads), V1 split heads and DIFF V2 vs Llama,
  with the peak-memory ratio;
- greedy decode throughput (batch 8, 128 prompt + 128 new tokens) vs Llama;
- one attention layer forward + backward (batch 4 × 4096, projections included) vs one Llama SDPA attention layer;
- attention calls alone, forward + backward (batch 4, causal), vs one SDPA call over (B, H, T, d): doubled heads as
  two SDPA calls and as one call over 2H heads, DIFF V2 as one call over 2H query heads, split heads as two SDPA calls
  with 2d-wide values and as one call of the fused Triton kernel (netmorph/modeling/split_diff_kernel.py).

The models are real conversions: a random Llama is saved, converted by `convert_diff_transformer` and loaded.

    python benchmarks/gpu_diff_attention.py                 # on a GPU; appends to BENCHMARKS.md
    python benchmarks/gpu_diff_attention.py --device cpu --small --no-write   # smoke run of the same code on CPU
Without CUDA (and without --device cpu) it prints that it skipped and exits 0.
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
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from netmorph.surgery.diff import convert_diff_transformer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import netmorph.auto  # noqa: E402,F401  (converted checkpoints load with the Auto classes)
from netmorph.modeling.split_diff_kernel import split_diff_attention, unsupported_reason  # noqa: E402
from netmorph.options import ConvertOptions  # noqa: E402

ANCHOR = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
              num_hidden_layers=4, vocab_size=32000, tokens=4096)
SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_hidden_layers=2, vocab_size=256, tokens=64)
VARIANTS = {"V1 doubled": {}, "V1 split": {"split_heads": True}, "V2": {"variant": "v2"}}


def timer(device: str, warm: int, repeats: int):
    """Median milliseconds of fn() (CUDA events on a GPU, perf_counter with a sync elsewhere)."""
    def measure(fn) -> float:
        for _ in range(warm):
            fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - begin))
        return statistics.median(times)
    return measure


def build_models(shape: dict, root: Path, device: str, dtype: torch.dtype) -> dict:
    config = LlamaConfig(**{k: v for k, v in shape.items() if k != "tokens"}, max_position_embeddings=2 * shape["tokens"],
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "llama")
    models = {"Llama": LlamaForCausalLM.from_pretrained(root / "llama", dtype=dtype, attn_implementation="sdpa")}
    for name, options in VARIANTS.items():
        out = root / name.replace(" ", "-")
        convert_diff_transformer(str(root / "llama"), out, ConvertOptions(verify=False, progress=False, **options))
        models[name] = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, attn_implementation="sdpa")
    return {name: model.to(device) for name, model in models.items()}


def layer_flops(config, tokens: float, variant: str) -> float:
    """Forward matmul FLOPs of one attention layer (projections + attention over `tokens` keys, full rows counted)
    per token."""
    D, H, G, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if variant == "V1 split":  # H/2 differential heads: QK over H heads once, PV over 2d-wide values twice
        return 2 * (D * (2 * H * d + 2 * G * d) + 2 * H * d * tokens + H * d * tokens)
    kind = {"Llama": "original", "V1 doubled": "v1", "V2": "v2"}[variant]
    q = 1 if kind == "original" else 2
    k = 2 if kind == "v1" else 1
    projections = D * (q * H * d + k * G * d + G * d + H * d) + (D * H if kind == "v2" else 0)
    return 2 * (projections + q * 2 * H * d * tokens)


def model_flops(config, tokens: float, variant: str) -> float:
    """Forward matmul FLOPs of one token through the whole model: attention layers, MLPs and the output head."""
    mlp_and_head = config.num_hidden_layers * 2 * 3 * config.hidden_size * config.intermediate_size
    mlp_and_head += 2 * config.hidden_size * config.vocab_size
    return config.num_hidden_layers * layer_flops(config, tokens, variant) + mlp_and_head


def attention_call_rows(shape: dict, device: str, dtype: torch.dtype, measure, batch: int) -> tuple[list[str], str]:
    """Attention calls alone (no projections), forward + backward, causal, vs one SDPA call over (B, H, T, d): each
    ratio next to its FLOP-ideal (attention FLOPs ∝ query heads × (q/k width + value width)). Returns the table lines
    and a note on the fused kernel (why it was skipped, or nothing)."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    H, G, d, T = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"], shape["tokens"]
    generator = torch.Generator().manual_seed(0)

    def tensor(heads, width):
        return torch.randn(batch, heads, T, width, generator=generator).to(device, dtype).requires_grad_()

    q, k, v = tensor(H, d), tensor(H, d), tensor(H, d)
    q2, k2 = tensor(2 * H, d), tensor(2 * H, d)
    q_pos, q_neg, k_pos, k_neg, v_wide = tensor(H // 2, d), tensor(H // 2, d), tensor(H // 2, d), tensor(H // 2, d), \
        tensor(H // 2, 2 * d)
    kv_g = tensor(G, d), tensor(G, d)

    def backward(*outs):
        sum(out.float().sum() for out in outs).backward()

    calls = {
        "one SDPA call (unit)": (lambda: backward(sdpa(q, k, v, is_causal=True)), 1.0),
        "doubled heads, two SDPA calls": (
            lambda: backward(sdpa(q, k, v, is_causal=True), sdpa(q, k, v, is_causal=True)), 2.0),
        "doubled heads, one call over 2H heads": (lambda: backward(sdpa(q2, k2, k2, is_causal=True)), 2.0),
        "V2, one call over 2H query heads": (
            lambda: backward(sdpa(q2, *kv_g, is_causal=True, enable_gqa=True)), 2.0),
        "split heads, two SDPA calls (2d values)": (
            lambda: backward(sdpa(q_pos, k_pos, v_wide, is_causal=True), sdpa(q_neg, k_neg, v_wide, is_causal=True)),
            1.5),
    }
    note = unsupported_reason(q_pos, q_neg, k_pos, k_neg, v_wide)
    if note is None:
        calls["split heads, fused Triton kernel"] = (
            lambda: backward(*split_diff_attention(q_pos, q_neg, k_pos, k_neg, v_wide, causal=True)), 1.5)
    times = {name: measure(fn) for name, (fn, _) in calls.items()}
    unit = times["one SDPA call (unit)"]
    lines = ["| attention call, fwd+bwd | ms | ratio to one SDPA call | FLOP-ideal |", "|---|---|---|---|"]
    lines += [f"| {name} | {times[name]:.3f} | {times[name] / unit:.3f} | {ideal:.3f} |"
              for name, (_, ideal) in calls.items()]
    if note is None and device == "cpu":
        note = "the fused kernel ran in Triton's CPU interpreter: its time is no measure of its speed"
    elif note is not None:
        note = f"fused split-heads kernel skipped: {note}"
    return lines, note or ""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="Tiny shapes (a smoke run of the same code).")
    parser.add_argument("--no-write", action="store_true", help="Print only; do not append to BENCHMARKS.md.")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: GPU benchmark skipped (use --device cpu --small for a smoke run)")
        return
    shape = SMALL if args.small else ANCHOR
    device, dtype, tokens = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32, shape["tokens"]
    measure = timer(device, warm=1 if args.small else 3, repeats=2 if args.small else 10)
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(shape, Path(tmp), device, dtype)
    config = models["Llama"].config
    generator = torch.Generator().manual_seed(0)
    train_ids = torch.randint(0, shape["vocab_size"], (2, tokens), generator=generator).to(device)
    prompt = torch.randint(0, shape["vocab_size"], (8, 128 if not args.small else 8), generator=generator).to(device)
    new_tokens = 128 if not args.small else 8

    rows, peaks = {}, {}
    for name, model in models.items():
        model.train()

        def step(model=model):
            model.zero_grad(set_to_none=True)
            model(train_ids, labels=train_ids).loss.backward()

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rows.setdefault("training step", {})[name] = measure(step)
        if device == "cuda":
            peaks[name] = torch.cuda.max_memory_allocated()
        model.zero_grad(set_to_none=True)
        model.eval()

        def decode(model=model):
            with torch.no_grad():
                model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

        rows.setdefault("greedy decode", {})[name] = measure(decode)
        attention = model.model.layers[0].self_attn
        hidden = torch.randn(4, tokens, config.hidden_size, device=device, dtype=dtype, requires_grad=True)
        positions = torch.arange(tokens, device=device)[None].expand(4, -1)
        cos_sin = model.model.rotary_emb(hidden, position_ids=positions)

        def layer(attention=attention, hidden=hidden, cos_sin=cos_sin):
            out, _ = attention(hidden, cos_sin, attention_mask=None)
            out.float().sum().backward()

        rows.setdefault("attention layer fwd+bwd", {})[name] = measure(layer)

    mean_context = prompt.shape[1] + new_tokens / 2
    ideal = {
        "training step": lambda v: model_flops(config, tokens, v) / model_flops(config, tokens, "Llama"),
        "greedy decode": lambda v: model_flops(config, mean_context, v) / model_flops(config, mean_context, "Llama"),
        "attention layer fwd+bwd": lambda v: layer_flops(config, tokens, v) / layer_flops(config, tokens, "Llama"),
    }
    names = [n for n in models if n != "Llama"]
    header = "| measurement | Llama (ms) | " + " | ".join(f"{n} (ms) | {n}/Llama | FLOP-ideal" for n in names) + " |"
    lines = [header, "|" + "---|" * (2 + 3 * len(names))]
    for measurement, times in rows.items():
        cells = [f"{times[n]:.2f} | {times[n] / times['Llama']:.3f} | {ideal[measurement](n):.3f}" for n in names]
        lines.append(f"| {measurement} | {times['Llama']:.2f} | " + " | ".join(cells) + " |")
    if peaks:
        lines.append("| training peak memory | {:.2f} GiB | ".format(peaks["Llama"] / 2**30) + " | ".join(
            f"{peaks[n] / 2**30:.2f} GiB | {peaks[n] / peaks['Llama']:.3f} | –" for n in names) + " |")
    call_lines, kernel_note = attention_call_rows(shape, device, dtype, measure, batch=4 if not args.small else 1)
    table = "\n".join(lines) + "\n\n" + "\n".join(call_lines) + (f"\n\n{kernel_note}" if kernel_note else "")
    print(table)
    if args.no_write:
        return
    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    command = "python benchmarks/gpu_diff_attention.py " + " ".join(sys.argv[1:])
    section = (
        f"\n## GPU: differential attention at the anchor shapes ({datetime.date.today().isoformat()})\n\n"
        f"Device: {device_name}; torch {torch.__version__}, transformers {transformers.__version__}, triton "
        f"{getattr(sys.modules.get('triton'), '__version__', 'not imported')}, Python "
        f"{platform.python_version()}; {str(dtype).removeprefix('torch.')}, SDPA; shapes {shape}; training step batch 2, "
        f"decode batch 8 × {prompt.shape[1]} + {new_tokens} new tokens, attention layer batch 4; attention calls "
        f"causal, batch {4 if not args.small else 1}, no projections; median times.\n"
        f"Command: `{command.strip()}`\n\n{table}\n"
    )
    print(f"appended to {write_section(section)}")


if __name__ == "__main__":
    main()
