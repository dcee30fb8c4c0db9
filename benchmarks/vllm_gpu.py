"""GPU check of netmorph's vLLM plugin (issue 19): equality with transformers, then decode throughput converted /
original. Prepared on a CPU machine; UNTESTED on a GPU until one is lent (the CUDA wheel vllm 0.33, its flash /
FlashInfer backends, CUDA graphs and tensor parallelism have not run this code).

What it does, with `pip install -e ".[vllm]"` on a CUDA machine:
1. Converts the bundled SmolLM2-135M (or --source DIR) three ways — DIFF V2, V1 doubled, V1 split (netmorph's
   default conversions, with mix set to 1 so the negative branch counts) — and serves each with vLLM
   (`LLM(model=dir)`, the plugin registered by its entry point), comparing the 32 greedy tokens on the default
   prompts with transformers on the same checkpoint (bf16, like serving; a branch at a near tie is reported, not
   failed: see tests/test_vllm.py).
2. Decode throughput: the original model and each conversion under vLLM, batch --batch prompts of --prompt-tokens
   random tokens, --new-tokens greedy tokens each (ignore_eos), CUDA graphs on (enforce_eager=False) unless
   --eager; output tokens per second and the ratio converted / original next to the FLOP-ideal attention ratio.
3. With --tp N (N GPUs): the V2 conversion served with tensor_parallel_size=N (heads % N == 0).
Appends a section to BENCHMARKS.md unless --no-write. Without CUDA it prints that it skipped and exits 0.

    python benchmarks/vllm_gpu.py                      # one GPU
    python benchmarks/vllm_gpu.py --tp 2               # also tensor parallelism over 2 GPUs
"""

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = {"v2": dict(variant="v2"), "doubled": dict(), "split": dict(split_heads=True)}


def convert_all(source: str | None, directory: Path) -> dict[str, Path]:
    """The three conversions of `source` (None: the bundled SmolLM2), mix = 1 in the V1 layouts."""
    import torch
    from safetensors.torch import load_file, save_file

    from netmorph.options import ConvertOptions
    from netmorph.surgery.diff import convert_diff_transformer

    outputs = {}
    for name, options in LAYOUTS.items():
        out = convert_diff_transformer(source, directory / name,
                                       ConvertOptions.build(verify=False, force=True, **options)).output_dir
        for path in out.glob("*.safetensors"):
            tensors = load_file(path)
            changed = {key: torch.ones_like(value) for key, value in tensors.items() if key.endswith(".mix")}
            if changed:
                save_file({**tensors, **changed}, path, metadata={"format": "pt"})
        outputs[name] = out
    return outputs


def original_dir(source: str | None, directory: Path) -> Path:
    """The source model as a Hugging Face directory (the bundled GGUF dequantized when source is None)."""
    from netmorph.sources import resolve_source

    resolved = resolve_source(source)
    resolved.load_model().save_pretrained(directory / "original")
    resolved.load_tokenizer().save_pretrained(directory / "original")
    return directory / "original"


def in_subprocess(function: str, **kwargs) -> dict:
    """Run `function` of this file in a fresh process (vLLM patches transformers in place; one engine per process)."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import vllm_gpu; "
            f"print('RESULT ' + json.dumps(vllm_gpu.{function}(**json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{function} failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][7:])


def transformers_greedy(model: str, prompts: list[list[int]], new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import netmorph.auto  # noqa: F401

    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).cuda().eval()
    tokens, gaps = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], device="cuda")
            out, gap = [], []
            for _ in range(new_tokens):
                top = torch.log_softmax(net(ids, use_cache=False).logits[0, -1].float(), -1).topk(2)
                out.append(int(top.indices[0]))
                gap.append(float(top.values[0] - top.values[1]))
                ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
            tokens.append(out)
            gaps.append(gap)
    return {"tokens": tokens, "gaps": gaps}


def vllm_run(model: str, prompts: list[list[int]], new_tokens: int, eager: bool, tp: int = 1) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, dtype="bfloat16", enforce_eager=eager, tensor_parallel_size=tp, seed=0,
              max_model_len=max(map(len, prompts)) + new_tokens + 8, gpu_memory_utilization=0.5)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    inputs = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
    llm.generate(inputs[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = [list(output.outputs[0].token_ids) for output in outputs]
    del llm
    gc.collect()
    return {"tokens": tokens, "tokens_per_second": sum(map(len, tokens)) / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=None, help="model dir/repo (default: the bundled SmolLM2-135M)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("vllm_gpu.py: no CUDA device, skipped")
        return 0
    from transformers import AutoTokenizer

    from netmorph.verify.compare import DEFAULT_PROMPTS

    lines = [f"## vLLM plugin on {torch.cuda.get_device_name()} ({datetime.date.today()})", ""]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        models = {"original": original_dir(args.source, directory), **convert_all(args.source, directory)}
        tokenizer = AutoTokenizer.from_pretrained(str(models["original"]))
        prompts = [tokenizer(text).input_ids for text in DEFAULT_PROMPTS]
        lines += ["| layout | greedy tokens vs transformers (bf16, 32 × 3 prompts) | branch points (step, top-2 gap) |",
                  "|---|---|---|"]
        for name in LAYOUTS:
            served = in_subprocess("vllm_run", model=str(models[name]), prompts=prompts, new_tokens=32, eager=True)
            expected = in_subprocess("transformers_greedy", model=str(models[name]), prompts=prompts, new_tokens=32)
            branches = []
            for got, want, gap in zip(served["tokens"], expected["tokens"], expected["gaps"]):
                step = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
                branches.append(None if step is None else (step, round(gap[step], 3)))
            lines.append(f"| {name} | {branches.count(None)}/{len(prompts)} equal | {branches} |")
        generator = torch.Generator().manual_seed(0)
        batch = torch.randint(100, tokenizer.vocab_size, (args.batch, args.prompt_tokens), generator=generator).tolist()
        lines += ["", f"Decode: batch {args.batch}, {args.prompt_tokens} prompt + {args.new_tokens} new tokens, bf16, "
                  f"CUDA graphs {'off' if args.eager else 'on'}.", "",
                  "| model | output tokens/s | ratio to original |", "|---|---|---|"]
        speeds = {}
        for name, path in models.items():
            speeds[name] = in_subprocess("vllm_run", model=str(path), prompts=batch, new_tokens=args.new_tokens,
                                         eager=args.eager)["tokens_per_second"]
            lines.append(f"| {name} | {speeds[name]:.0f} | {speeds[name] / speeds['original']:.3f} |")
        if args.tp > 1:
            speed = in_subprocess("vllm_run", model=str(models["v2"]), prompts=batch, new_tokens=args.new_tokens,
                                  eager=args.eager, tp=args.tp)["tokens_per_second"]
            lines.append(f"| v2, tensor_parallel_size={args.tp} | {speed:.0f} | {speed / speeds['original']:.3f} |")
    print("\n".join(lines))
    if not args.no_write:
        with open(ROOT / "BENCHMARKS.md", "a") as handle:
            handle.write("\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
