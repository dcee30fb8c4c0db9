"""The fused split-heads kernel (netmorph/modeling/split_diff_kernel.py): forward and backward against a float64
reference with an explicit boolean mask, for every mask kind it covers, GQA and dtypes; then a converted split-layout
model with NETMORPH_SPLIT_KERNEL=on against its default sdpa path.

Without a GPU the kernel runs in Triton's CPU interpreter: conftest.py sets TRITON_INTERPRET=1 before anything imports
triton (Triton reads it when its own library functions are decorated). With a GPU the kernel tests run on it. GPU speed
is not measured here (benchmarks/gpu_diff_attention.py does).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the fused split-heads kernel cannot run")

from netmorph.modeling import split_diff_kernel
from netmorph.modeling.split_diff_kernel import interpreter_mode, split_diff_attention
from tests.helpers import cache_argument, convert, load, random_ids, save_tiny_model

DEVICE = "cpu" if interpreter_mode() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU: the kernel has nowhere to run", allow_module_level=True)
needs_interpreter = pytest.mark.skipif(DEVICE != "cpu", reason="the model tests drive the kernel on CPU")

BLOCKS = dict(block_m=16, block_n=16)
# max |error| relative to max |reference| (per output); fp32 accumulates in fp32, bf16/fp16 round P and dS to 16 bits
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def causal_allowed(length: int, keys: int, window: int | None = None) -> torch.Tensor:
    """(T, S) bool, bottom-right aligned: query i sits at key position i + S − T."""
    behind = torch.arange(length)[:, None] + keys - length - torch.arange(keys)[None, :]
    allowed = behind >= 0
    return allowed & (behind < window) if window is not None else allowed


def reference(q_pos, q_neg, k_pos, k_neg, value, allowed, scale):
    """float64 o_pos, o_neg with explicit GQA grouping and boolean mask (B, 1, T, S); rows with no key → 0."""
    groups = q_pos.shape[1] // k_pos.shape[1]
    value = value.double().repeat_interleave(groups, dim=1)
    outs = []
    for q, k in ((q_pos, k_pos), (q_neg, k_neg)):
        scores = q.double() @ k.double().repeat_interleave(groups, dim=1).transpose(-1, -2) * scale
        probabilities = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        outs.append(probabilities @ value)
    return outs


def inputs(batch, heads, groups, length, keys, head_dim, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, length, head_dim)] * 2 + [(batch, groups, keys, head_dim)] * 2
    shapes.append((batch, groups, keys, 2 * head_dim))
    return [torch.randn(shape, generator=generator).to(DEVICE, dtype).requires_grad_() for shape in shapes]


class PoisonedTorch:
    """`torch` as the kernel module sees it, with every torch.empty / empty_like filled with NaN: an output element
    the kernels forget to write shows up."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))

    @staticmethod
    def empty_like(*args, **kwargs):
        return torch.empty_like(*args, **kwargs).fill_(float("nan"))


def assert_close(actual, expected, dtype, what):
    error = (actual.double() - expected).abs().max().item()
    bound = TOL[dtype] * max(1.0, expected.abs().max().item())
    assert error <= bound, f"{what}: max error {error:.3e} > {bound:.3e}"


# (name, batch, query heads, kv groups, T, S, head_dim, causal, window, explicit mask builder or None)
def left_padding(batch, length, keys):
    allowed = causal_allowed(length, keys)[None, None].repeat(batch, 1, 1, 1)
    allowed[1, ..., :5] = False  # sequence 1 is left-padded by 5: its first 5 query rows see no key at all
    return allowed


def packed_documents(batch, length, keys):
    documents = (torch.arange(keys) >= 6).long() + (torch.arange(keys) >= 11).long()
    return (causal_allowed(length, keys) & (documents[:, None] == documents[None, :]))[None, None]


def prefix_lm(batch, length, keys):
    prefix = (torch.arange(length)[:, None] < 6) & (torch.arange(keys)[None, :] < 6)
    return (causal_allowed(length, keys) | prefix)[None, None].expand(batch, 1, -1, -1)


CASES = {
    "causal square": (2, 4, 2, 17, 17, None, True, None, None),
    "causal square, one block": (1, 4, 2, 1, 1, None, True, None, None),
    "decode one token": (2, 4, 2, 1, 17, None, True, None, None),
    "decode k tokens past a long cache": (1, 4, 2, 5, 64, None, True, None, None),
    "no mask": (2, 4, 2, 17, 33, None, False, None, None),
    "sliding window": (1, 4, 2, 64, 64, None, True, 7, None),
    "sliding window, decode past the window": (1, 4, 2, 3, 40, None, True, 7, None),
    "left padding with all-padding rows": (2, 4, 2, 17, 17, None, True, None, left_padding),
    "packed documents (block diagonal)": (1, 4, 2, 17, 17, None, False, None, packed_documents),
    "prefix-LM 4-D mask": (2, 4, 2, 17, 17, None, False, None, prefix_lm),
    "GQA, one kv group": (1, 4, 1, 17, 17, None, True, None, None),
    "head_dim not a power of two": (1, 2, 2, 17, 17, 24, True, None, None),
}


def run_case(monkeypatch, name, dtype, seed=0):
    batch, heads, groups, length, keys, head_dim, causal, window, explicit = CASES[name]
    head_dim = head_dim or 16
    tensors = inputs(batch, heads, groups, length, keys, head_dim, dtype, seed)
    mask = explicit(batch, length, keys).to(DEVICE) if explicit else None
    allowed = torch.ones(batch, 1, length, keys, dtype=torch.bool)
    if causal or window:
        allowed = allowed & causal_allowed(length, keys, window)
    if mask is not None:
        allowed = allowed & mask
    scale = head_dim**-0.5
    monkeypatch.setattr(split_diff_kernel, "torch", PoisonedTorch())
    out_pos, out_neg = split_diff_attention(*tensors, scale=scale, causal=causal, window=window, mask=mask, **BLOCKS)
    expected = reference(*tensors, allowed.to(DEVICE), scale)
    for actual, want, what in zip((out_pos, out_neg), expected, ("o_pos", "o_neg")):
        assert actual.dtype == dtype and torch.isfinite(actual).all(), what
        assert_close(actual, want, dtype, what)
    generator = torch.Generator().manual_seed(seed + 1)
    grad_pos, grad_neg = (torch.randn(out.shape, generator=generator).to(DEVICE, dtype) for out in (out_pos, out_neg))
    grads = torch.autograd.grad((out_pos * grad_pos).sum() + (out_neg * grad_neg).sum(), tensors)
    expected_grads = torch.autograd.grad(
        (expected[0] * grad_pos.double()).sum() + (expected[1] * grad_neg.double()).sum(), tensors)
    for actual, want, what in zip(grads, expected_grads, ("dq_pos", "dq_neg", "dk_pos", "dk_neg", "dv")):
        assert actual.dtype == dtype and torch.isfinite(actual).all(), what
        assert_close(actual, want, dtype, what)
    return allowed, grads


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_backward_match_the_float64_reference(monkeypatch, name):
    run_case(monkeypatch, name, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["causal square", "left padding with all-padding rows", "decode one token"])
def test_half_precision_matches_within_its_rounding(monkeypatch, name, dtype):
    run_case(monkeypatch, name, dtype)


def test_masked_keys_and_empty_rows_get_exactly_zero(monkeypatch):
    allowed, (dq_pos, dq_neg, dk_pos, dk_neg, dv) = run_case(monkeypatch, "left padding with all-padding rows",
                                                            torch.float32)
    # sequence 1's padding keys (0..4) are attended by no query: their key and value gradients are exactly 0
    assert not allowed[1, :, :, :5].any()
    for grad in (dk_pos, dk_neg, dv):
        assert grad[1, :, :5].abs().max().item() == 0.0
        assert grad[1, :, 5:].abs().max().item() > 0.0
    # its padding query rows see no key: zero query gradients (and, checked against the reference, zero outputs)
    for grad in (dq_pos, dq_neg):
        assert grad[1, :, :5].abs().max().item() == 0.0


def test_empty_rows_output_zero():
    q_pos, q_neg, k_pos, k_neg, value = inputs(1, 2, 1, 4, 6, 16, torch.float32, seed=3)
    mask = torch.ones(1, 1, 4, 6, dtype=torch.bool, device=DEVICE)
    mask[..., 2, :] = False
    out_pos, out_neg = split_diff_attention(q_pos, q_neg, k_pos, k_neg, value, mask=mask, **BLOCKS)
    assert out_pos[0, :, 2].abs().max().item() == 0.0 and out_neg[0, :, 2].abs().max().item() == 0.0
    assert out_pos[0, :, 1].abs().max().item() > 0.0


@pytest.mark.parametrize("change,message", [
    (lambda t, m: (t, m[:, :, None].expand(2, 1, 3, 17, 17)), "non-4-D"),
    (lambda t, m: (t, m.expand(2, 4, 17, 17)), "per-head"),
    (lambda t, m: (t, m.float()), "bool"),
    (lambda t, m: ([t[0], t[1], t[2], t[3], t[4][..., :16]], m), "width 2·head_dim"),
    (lambda t, m: ([x.double() for x in t], m), "dtypes"),
])
def test_unsupported_input_raises_a_clear_error(change, message):
    tensors = inputs(2, 4, 2, 17, 17, 16, torch.float32, seed=0)
    tensors, mask = change(tensors, torch.ones(2, 1, 17, 17, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match=message):
        split_diff_attention(*tensors, mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# The model path: a converted split-layout model with λ switched on


@pytest.fixture(scope="module")
def split_model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("split-kernel")
    # Mistral: sliding window 7, so both the explicit window mask and the cache longer than the window are exercised
    save_tiny_model(root / "mistral", "mistral", num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    return convert(root / "mistral", root / "split", split_heads=True).output_dir


def switched_on(path):
    model = load(path, "sdpa")
    generator = torch.Generator().manual_seed(5)
    for layer in model.model.layers:
        attention = layer.self_attn
        attention.mix.fill_(0.7)
        with torch.no_grad():
            attention.lambda_q1.fill_(0.2)
            attention.lambda_k1.fill_(0.2)
            for vector in (attention.lambda_q2, attention.lambda_k2):
                vector.copy_(0.1 * torch.randn(vector.shape, generator=generator))
        assert abs(attention.lambda_full().item()) > 0.1  # the negative map matters
    return model


def padded_batch():
    ids = random_ids(batch=3, length=14, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    return ids, mask


def logits_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=mask, use_cache=False).logits
    (logits * mask[..., None]).square().sum().backward()  # a loss over real tokens only
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@needs_interpreter
def test_model_with_the_kernel_matches_its_default_path(split_model_dir, monkeypatch):
    model = switched_on(split_model_dir)
    ids, mask = padded_batch()
    monkeypatch.setenv("NETMORPH_SPLIT_KERNEL", "off")
    expected_logits, expected_grads = logits_and_grads(model, ids, mask)
    monkeypatch.setenv("NETMORPH_SPLIT_KERNEL", "on")
    calls = []
    original = split_diff_kernel.SplitDiffAttentionFunction.apply
    monkeypatch.setattr(split_diff_kernel.SplitDiffAttentionFunction, "apply",
                        lambda *args: calls.append(1) or original(*args))
    logits, grads = logits_and_grads(model, ids, mask)
    assert len(calls) == model.config.num_hidden_layers  # the kernel really ran, once per layer
    real = mask.bool()  # padding rows differ by design: the kernel gives them 0, sdpa uniform attention
    assert (logits - expected_logits)[real].abs().max().item() <= 2e-5
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        scale = max(1.0, expected_grads[name].abs().max().item())
        assert (grad - expected_grads[name]).abs().max().item() <= 2e-5 * scale, name


@needs_interpreter
def test_model_prefill_and_decode_with_the_kernel_equals_one_forward(split_model_dir, monkeypatch):
    model = switched_on(split_model_dir)
    ids = random_ids(batch=2, length=20, seed=11)  # longer than the window of 7
    monkeypatch.setenv("NETMORPH_SPLIT_KERNEL", "off")
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    monkeypatch.setenv("NETMORPH_SPLIT_KERNEL", "on")
    with torch.no_grad():
        out = model(ids[:, :12], use_cache=True)
        cache, pieces = out.past_key_values, [out.logits]
        for start, stop in ((12, 13), (13, 17), (17, 20)):  # decode 1, then k > 1
            out = model(ids[:, start:stop], **cache_argument(model, cache), use_cache=True)
            pieces.append(out.logits)
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 2e-5


@needs_interpreter
def test_kernel_on_refuses_what_it_does_not_cover(split_model_dir, monkeypatch):
    model = load(split_model_dir, "eager")
    monkeypatch.setenv("NETMORPH_SPLIT_KERNEL", "on")
    with pytest.raises(ValueError, match="replaces sdpa"), torch.no_grad():
        model(random_ids(batch=1, length=4))
    monkeypatch.setenv("NETMORPH_SPLIT_KERNEL", "sometimes")
    with pytest.raises(ValueError, match="auto, on or off"), torch.no_grad():
        model(random_ids(batch=1, length=4))


@needs_interpreter
@pytest.mark.parametrize("mode", [None, "auto"])
def test_default_and_auto_keep_the_unfused_path_on_cpu(split_model_dir, monkeypatch, mode):
    """The default is off until the kernel has run on a GPU; auto uses it on CUDA only."""
    model = load(split_model_dir, "sdpa")
    if mode is None:
        monkeypatch.delenv("NETMORPH_SPLIT_KERNEL", raising=False)
    else:
        monkeypatch.setenv("NETMORPH_SPLIT_KERNEL", mode)
    monkeypatch.setattr(split_diff_kernel.SplitDiffAttentionFunction, "apply",
                        lambda *args: pytest.fail(f"the kernel ran in mode {mode} on CPU"))
    with torch.no_grad():
        model(random_ids(batch=1, length=4))


def test_split_conversion_loads_as_remote_code_without_netmorph_or_triton(split_model_dir, tmp_path):
    """The kernel file travels with the modeling code; a process where neither netmorph nor triton can be imported
    loads the split conversion with trust_remote_code alone (transformers' import check included) and runs it."""
    assert (split_model_dir / "split_diff_kernel.py").exists()
    script = textwrap.dedent(f"""
        import sys
        sys.modules["netmorph"] = None  # any import of netmorph now raises ImportError
        sys.modules["triton"] = None
        import torch
        from transformers import AutoModelForCausalLM
        ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
        logits = {{}}
        for backend in ("eager", "sdpa"):
            model = AutoModelForCausalLM.from_pretrained({str(split_model_dir)!r}, trust_remote_code=True,
                                                         dtype=torch.float32, attn_implementation=backend)
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                logits[backend] = model(ids).logits
        print("MAXDIFF", (logits["eager"] - logits["sdpa"]).abs().max().item())
    """)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf-home"),
           "NETMORPH_SPLIT_KERNEL": "auto", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split("MAXDIFF")[1]) <= 2e-5
