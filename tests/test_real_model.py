"""The bundled SmolLM2-135M-Instruct (fp32, 30 layers, 9 query / 3 KV heads, tied embeddings) on real text."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoTokenizer

from netmorph.sources import default_texts
from tests.helpers import convert, load

pytestmark = pytest.mark.real_model

EXACT_MODES = {"default": {}, "zero-init": {"negative_init": "zero"}, "mirror": {"negative_init": "mirror"}}


@pytest.fixture(scope="module")
def converted_dirs(smollm2_dir, module_tmp_path):
    return {mode: convert(smollm2_dir, module_tmp_path / mode, **options).output_dir for mode, options in EXACT_MODES.items()}


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def real_texts(tokenizer):
    texts = [tokenizer(text, return_tensors="pt").input_ids[:, :320] for text in default_texts().values()]
    assert len(texts) == 2 and all(ids.shape[1] >= 256 for ids in texts)
    return texts


def greedy_ids(model, tokenizer, prompt="The quick brown fox", new_tokens=32, **kwargs):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=tokenizer.eos_token_id, **kwargs)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", EXACT_MODES)
def test_exact_on_real_text(smollm2_dir, converted_dirs, tokenizer, real_texts, mode, backend):
    original, converted = load(smollm2_dir, backend), load(converted_dirs[mode], backend)
    with torch.no_grad():
        for ids in real_texts:
            diff = (original(ids).logits - converted(ids).logits).abs().max().item()
            assert diff <= 1e-4, f"{mode}/{backend}: max |Δlogit| {diff:.3e}"
    assert torch.equal(greedy_ids(original, tokenizer), greedy_ids(converted, tokenizer))


def test_kv_cache_generation_equals_full_forward(converted_dirs, tokenizer):
    model = load(converted_dirs["default"], "sdpa")
    prompt_len = tokenizer("The quick brown fox", return_tensors="pt").input_ids.shape[1]
    out = greedy_ids(model, tokenizer, output_scores=True, return_dict_in_generate=True)
    cached_logits = torch.stack(out.scores, dim=1)[0]  # (32, vocab): logits of each generated step, from the cache
    with torch.no_grad():
        full = model(out.sequences, use_cache=False).logits[0, prompt_len - 1 : -1]
    assert torch.equal(full.argmax(-1), out.sequences[0, prompt_len:])
    assert (full - cached_logits).abs().max().item() <= 1e-4
    no_cache = greedy_ids(model, tokenizer, use_cache=False)
    assert torch.equal(no_cache, out.sequences)


def _grads_at_full_mix(directory, ids):
    model = load(directory, "sdpa").train()
    for layer in model.model.layers:
        layer.self_attn.mix.fill_(1.0)
    model(ids, labels=ids).loss.backward()
    return model


@pytest.mark.parametrize("mode", ["default", "mirror", "zero-init"])
def test_trainability_at_full_mix(converted_dirs, real_texts, mode):
    model = _grads_at_full_mix(converted_dirs[mode], real_texts[0][:, :128])
    config = model.config
    q_rows, k_rows = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    for layer in model.model.layers:
        attn = layer.self_attn
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            assert getattr(attn, name).grad.abs().max() > 0, name
        negative_q, negative_k = attn.q_proj.weight.grad[q_rows:], attn.k_proj.weight.grad[k_rows:]
        if mode == "zero-init":
            # Documented saddle: zero q2 and zero k2 give each other zero gradient.
            assert negative_q.abs().max() == 0 and negative_k.abs().max() == 0
        else:
            assert negative_q.abs().max() > 0 and negative_k.abs().max() > 0
    assert torch.isfinite(torch.stack([p.grad.abs().max() for p in model.parameters() if p.grad is not None])).all()


def test_mix_survives_save_and_reload(converted_dirs, tmp_path):
    model = load(converted_dirs["default"])
    assert all(layer.self_attn.mix.item() == 0.0 for layer in model.model.layers)
    for layer in model.model.layers:
        layer.self_attn.mix.fill_(0.375)
    model.save_pretrained(tmp_path / "mid-warmup")
    reloaded = load(tmp_path / "mid-warmup")
    assert all(layer.self_attn.mix.item() == 0.375 for layer in reloaded.model.layers)


def test_loads_and_generates_without_netmorph(converted_dirs):
    """A fresh process where `import netmorph` fails: trust_remote_code must be enough."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["netmorph"] = None  # any import of netmorph now raises ImportError
        sys.modules["triton"] = None  # nor is Triton needed (the fused split-heads kernel is optional)
        try:
            import netmorph
            raise SystemExit("netmorph importable")
        except ImportError:
            pass
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = {str(converted_dirs["default"])!r}
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        print("GENERATED", out.shape[1] - ids.shape[1])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(converted_dirs["default"].parent / "hf-home"),
                                 "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GENERATED 8" in result.stdout


def test_sublayer_norm_divergence_is_measured_and_reported(smollm2_dir, tmp_path, capsys):
    result = convert(smollm2_dir, tmp_path / "subln", sublayer_norm=True, verify=True)
    report = result.reports[0]
    card = (tmp_path / "subln" / "README.md").read_text()
    assert "Approximate" in card and f"{report.max_abs_logit_diff:.3e}" in card
    # The report's figure is the real divergence: recompute it independently.
    original, converted = load(smollm2_dir, "sdpa"), load(tmp_path / "subln", "sdpa")
    ids = AutoTokenizer.from_pretrained(str(smollm2_dir))(next(iter(default_texts().values())), return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        diff = (original(ids).logits - converted(ids).logits).abs().max().item()
    assert diff == pytest.approx(report.texts[0].max_abs_logit_diff, rel=1e-4)
    assert diff > 1e-2  # a per-head RMSNorm cannot preserve the function
    with capsys.disabled():
        print(f"\n[measured] --sublayer-norm on SmolLM2: max |Δlogit| {report.max_abs_logit_diff:.3f}, "
              f"loss {report.texts[0].loss_original:.4f} → {report.texts[0].loss_converted:.4f}")


def test_verify_command_reports_and_sets_exit_status(smollm2_dir, converted_dirs, tmp_path):
    import json

    from click.testing import CliRunner

    from netmorph.cli import main

    runner = CliRunner()
    args = ["--json", "--max-tokens", "256", "--new-tokens", "16", "--prompt", "The quick brown fox"]
    result = runner.invoke(main, ["verify", str(smollm2_dir), str(converted_dirs["mirror"]), *args])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and len(report["texts"]) == 2 and report["max_abs_logit_diff"] <= 1e-4
    assert all(t["tokens"] == 256 for t in report["texts"])

    switched_on = load(converted_dirs["mirror"])  # mirror weights at mix = 1: output becomes (1 − λ)·attention
    for layer in switched_on.model.layers:
        layer.self_attn.mix.fill_(1.0)
    switched_on.save_pretrained(tmp_path / "mix1")
    result = runner.invoke(main, ["verify", str(smollm2_dir), str(tmp_path / "mix1"), *args])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["max_abs_logit_diff"] > 1e-2


def test_evaluate_compare_gives_equal_loss_for_the_exact_conversion(smollm2_dir, converted_dirs):
    import json

    from click.testing import CliRunner

    from netmorph.cli import main
    from netmorph.sources import default_text_files

    args = ["--dataset", str(default_text_files()[0]), "--sequence-len", "256", "--max-blocks", "2", "--json"]
    result = CliRunner().invoke(main, ["evaluate", str(converted_dirs["default"]), "--compare", str(smollm2_dir), *args])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    converted, original = report["results"]
    assert converted["tokens"] == original["tokens"] == 2 * 255
    assert abs(converted["loss"] - original["loss"]) <= 1e-4 and 1.0 < original["loss"] < 5.0


def test_bundled_gguf_converts_with_no_source(tmp_path):
    """What `make demo` runs: no SOURCE → the bundled SmolLM2 GGUF, converted and verified."""
    from click.testing import CliRunner

    from netmorph.cli import main

    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["convert-diff-transformer", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "Generations match!" in result.stdout and "PASS" in result.stdout
    card = (out / "README.md").read_text()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in card and "**Exact**" in card and "Generations match!" in card
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "config.yml",
                 "modeling_netmorph_diff.py", "configuration_netmorph_diff.py"):
        assert (out / name).exists(), name


def test_diffllama_export_of_the_real_model(smollm2_dir, tmp_path, capsys):
    """A stock DiffLlama (no remote code) built from SmolLM2: the reported divergence is what this test measures,
    and the value anchor keeps it near the model's own rounding noise."""
    from transformers import AutoModelForCausalLM, DiffLlamaForCausalLM

    result = convert(smollm2_dir, tmp_path / "diffllama", export="diffllama", verify=True)
    report = result.reports[0]
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "diffllama"), dtype=torch.float32,
                                                    attn_implementation="sdpa").eval()
    assert type(exported) is DiffLlamaForCausalLM
    original = load(smollm2_dir, "sdpa")
    ids = AutoTokenizer.from_pretrained(str(smollm2_dir))(next(iter(default_texts().values())), return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        logits_a, logits_b = original(ids).logits[0], exported(ids).logits[0]
    diff = (logits_a - logits_b).abs().max().item()
    loss = [torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item() for logits in (logits_a, logits_b)]
    assert diff == pytest.approx(report.texts[0].max_abs_logit_diff, rel=1e-3)
    assert loss[1] - loss[0] == pytest.approx(report.texts[0].loss_converted - report.texts[0].loss_original, abs=1e-5)
    assert diff < 2e-2 and abs(loss[1] - loss[0]) < 1e-4 and report.generations_match
    with capsys.disabled():
        print(f"\n[measured] --export diffllama on SmolLM2: max |Δlogit| {report.max_abs_logit_diff:.2e}, "
              f"loss {report.texts[0].loss_original:.5f} → {report.texts[0].loss_converted:.5f}")


def test_diff_v2_on_the_real_model_is_exact_and_trains_the_pairs_apart(smollm2_dir, tmp_path, real_texts, tokenizer,
                                                                       capsys):
    """DIFF V2 of SmolLM2 (fp32): the same logits up to the backend's own rounding (≤ 1e-6) and the same greedy text;
    one backward pass gives the paired query heads non-zero, different gradients."""
    converted_dir = convert(smollm2_dir, tmp_path / "v2", variant="v2").output_dir
    measured = {}
    for backend in ("eager", "sdpa"):
        original, converted = load(smollm2_dir, backend), load(converted_dir, backend)
        with torch.no_grad():
            measured[backend] = max((original(ids).logits - converted(ids).logits).abs().max().item() for ids in real_texts)
        assert measured[backend] <= 1e-6, measured
        assert torch.equal(greedy_ids(original, tokenizer), greedy_ids(converted, tokenizer))
    converted.train()
    ids = real_texts[0][:, :128]
    converted(ids, labels=ids).loss.backward()
    for layer in converted.model.layers:
        attention = layer.self_attn
        grad = attention.q_proj.weight.grad.view(-1, 2, attention.head_dim, attention.q_proj.in_features)
        assert grad[:, 0].abs().max() > 0 and grad[:, 1].abs().max() > 0
        assert not torch.allclose(grad[:, 0], grad[:, 1])
    with capsys.disabled():
        print(f"\n[measured] --variant v2 on SmolLM2: max |Δlogit| eager {measured['eager']:.2e}, "
              f"sdpa {measured['sdpa']:.2e}")
