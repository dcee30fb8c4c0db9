"""`netmorph probe`: each probe on a tiny model whose answer is known by construction or by hand computation."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.stats import kurtosis as scipy_kurtosis
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from netmorph.cli import main
from netmorph.probes.outliers import activation_outliers, excess_kurtosis, site_stats
from netmorph.probes.quantization import (
    activation_fake_quantization,
    block_loss,
    fake_quantize_per_token,
    quantization_probe,
)
from netmorph.probes.retrieval import CITIES, build_samples, retrieval_probe
from netmorph.train.callbacks import diff_attention_modules, set_mix
from tests.helpers import convert, load, save_char_tokenizer, save_tiny_model

# ---------------------------------------------------------------------------------------------------- outliers


def test_kurtosis_and_ratio_match_scipy_and_numpy():
    x = torch.randn(5, 7, 40, generator=torch.Generator().manual_seed(0))
    x[..., 3] *= 30  # a planted outlier channel
    stats = site_stats(x, top_k=2)
    flat = x.reshape(-1, 40).numpy().astype(np.float64)
    assert stats.kurtosis == pytest.approx(scipy_kurtosis(flat, axis=-1, fisher=True).mean(), rel=1e-6)
    assert stats.max_over_median == pytest.approx(np.abs(flat).max() / np.median(np.abs(flat)), rel=1e-5)
    assert stats.top_channels[0]["channel"] == 3
    # one spike among D zeros, by hand: mean 1/D, central moments m2 and m4 written out
    spike = torch.zeros(1, 10, dtype=torch.float64)
    spike[0, 4] = 1.0
    d = 10
    m2 = (1 - 1 / d) ** 2 / d + (d - 1) / d**3
    m4 = (1 - 1 / d) ** 4 / d + (d - 1) / d**5
    assert excess_kurtosis(spike).item() == pytest.approx(m4 / m2**2 - 3, rel=1e-12)


def tiny_llama_model(seed=0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**{**dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=True),
                            **overrides})
    return LlamaForCausalLM(config).eval()


def test_planted_outlier_channels_are_found():
    model = tiny_llama_model()
    residual_channel, attention_channel = 17, 42
    with torch.no_grad():
        model.model.embed_tokens.weight[:, residual_channel] += 40.0  # every token carries it: residual outlier
        model.model.layers[1].self_attn.o_proj.weight[attention_channel] *= 200.0  # layer 1's attention output
    blocks = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    layers = activation_outliers(model, blocks)
    assert layers[0].residual.top_channels[0]["channel"] == residual_channel
    for layer in layers[1:]:  # layer 1's attention outlier enters the residual stream next to the planted one
        assert {c["channel"] for c in layer.residual.top_channels[:2]} == {residual_channel, attention_channel}
    assert layers[1].attention.top_channels[0]["channel"] == attention_channel
    assert layers[1].attention.max_over_median > 10 * layers[0].attention.max_over_median
    assert layers[1].attention.kurtosis > 20 > layers[0].attention.kurtosis
    # The residual stream against the model's own hidden states (output_hidden_states; the last one is after the
    # final norm, so layers 0..L-2) and an independent numpy/scipy computation.
    with torch.no_grad():
        hidden = model(blocks, output_hidden_states=True, use_cache=False).hidden_states
    for index in range(2):
        flat = hidden[index + 1].reshape(-1, 64).double().numpy()
        assert layers[index].residual.max_abs == pytest.approx(np.abs(flat).max(), rel=1e-5)
        assert layers[index].residual.max_over_median == pytest.approx(np.abs(flat).max() / np.median(np.abs(flat)),
                                                                       rel=1e-4)
        assert layers[index].residual.kurtosis == pytest.approx(scipy_kurtosis(flat, axis=-1).mean(), rel=1e-4)
        assert layers[index].residual.kurtosis > 20  # one channel far above the rest of each token


# ---------------------------------------------------------------------------------------------------- retrieval

HAYSTACK = ("the licensee may copy and distribute verbatim copies of the program as you receive it in any medium "
            "provided that you conspicuously publish on each copy an appropriate notice ") * 3
NUMBERS = [str(n) for n in range(10, 100)]


def word_tokenizer(directory):
    """A real word-level tokenizer (whitespace and punctuation split) whose vocabulary holds the haystack, the needle
    and question templates, the cities and every two-digit number as one token each."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(HAYSTACK.split()) | {"The", "magic", "number", "of", "is", "What", "?", ".", *CITIES})
    vocab = {"<unk>": 0} | {w: i + 1 for i, w in enumerate(words)}
    vocab |= {n: len(vocab) + i for i, n in enumerate(NUMBERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<unk>")
    tokenizer.save_pretrained(directory)
    return tokenizer


def pointing_model(tokenizer, attend: bool = True) -> LlamaForCausalLM:
    """One layer, one head of width 32, RoPE so slow (θ = 1e12) that the last rotary pair (dims 15, 31) does not turn
    over 512 positions. Embeddings: dim 0 = 1 for every token, dim 1 = 1 for number tokens, dims 2.. a random unit
    code per token. q reads dim 0 and k reads dim 1 into dim 15, so the last token's query scores number tokens
    ~80 higher than any other: attention points at the needle's number. v copies the code dims ×10 and o is the
    identity, the MLP writes 0 and lm_head is the tied embedding, so the attended number's code dominates the logits.
    With attend=False q is zero: attention is uniform over the causal prefix."""
    vocab = len(tokenizer)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                         tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e12},
                         rms_norm_eps=1e-6)
    model = LlamaForCausalLM(config).eval()
    numbers = set(tokenizer.convert_tokens_to_ids(NUMBERS))
    codes = torch.randn(vocab, 30, generator=torch.Generator().manual_seed(0))
    codes /= codes.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
        embedding = model.model.embed_tokens.weight
        embedding[:, 0] = 1.0
        embedding[list(numbers), 1] = 1.0
        embedding[:, 2:] = codes
        attention = model.model.layers[0].self_attn
        if attend:
            attention.q_proj.weight[15, 0] = 6.0
            attention.k_proj.weight[15, 1] = 6.0
        attention.v_proj.weight[2:, 2:] = 10.0 * torch.eye(30)
        attention.o_proj.weight.copy_(torch.eye(32))
    return model


@pytest.fixture(scope="module")
def needle_setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pointing")
    tokenizer = word_tokenizer(directory)
    pointing_model(tokenizer).save_pretrained(directory)
    uniform = tmp_path_factory.mktemp("uniform")
    tokenizer.save_pretrained(uniform)
    pointing_model(tokenizer, attend=False).save_pretrained(uniform)
    return tokenizer, directory, uniform


def test_needle_samples_place_the_answer_where_they_say(needle_setup):
    tokenizer = needle_setup[0]
    samples = build_samples(tokenizer, HAYSTACK, [60, 120], [0.0, 0.5, 1.0], num_needles=3, digits=2, seed=3)
    assert len(samples) == 6
    for sample in samples:
        assert len(sample.input_ids) == sample.length
        text = tokenizer.decode(sample.input_ids)
        assert text.count("magic number of") == 5  # three needles, twice in the question
        assert tokenizer.decode(sample.input_ids[slice(*sample.answer_span)]) == sample.answer
        assert tokenizer.decode(sample.input_ids[sample.question_end:]) == sample.answer
        assert tokenizer.decode(sample.input_ids[sample.context_end:sample.question_end]).startswith("What is")
        assert f"magic number of {sample.city} is {sample.answer}" in text
        relative = sample.answer_span[0] / sample.context_end
        assert abs(relative - sample.depth) < 0.25  # the asked needle sits at its depth


def test_attention_pointing_at_the_needle_retrieves_it(needle_setup):
    tokenizer, pointing, _ = needle_setup
    model = load(pointing)
    samples = build_samples(tokenizer, HAYSTACK, [64, 200], [0.1, 0.5, 0.9], num_needles=1, digits=2)
    result = retrieval_probe(model, samples)
    assert result.accuracy == 1.0
    assert result.answer_mass[0] > 0.999 and result.noise_mass[0] < 1e-3
    # three needles: the query points at every number equally, a third each
    three = retrieval_probe(model, build_samples(tokenizer, HAYSTACK, [120], [0.5], num_needles=3, digits=2))
    assert three.answer_mass[0] == pytest.approx(1 / 3, abs=1e-3)


def test_uniform_attention_mass_is_the_span_fraction(needle_setup):
    tokenizer, _, uniform = needle_setup
    samples = build_samples(tokenizer, HAYSTACK, [90], [0.3, 0.7], num_needles=2, digits=2)
    result = retrieval_probe(load(uniform), samples)
    for sample, trial in zip(samples, result.trials):
        keys = sample.question_end  # the last question token sees every position up to itself
        assert trial.answer_mass[0] == pytest.approx(1 / keys, rel=1e-5)
        assert trial.noise_mass[0] == pytest.approx((sample.context_end - 1) / keys, rel=1e-5)


def test_differential_components(needle_setup, tmp_path):
    """V1 with zero negative q/k: the negative map is uniform (1/keys on the answer), the positive map is the
    original's, and the differential map is positive − λ·negative. DIFF V2: both maps are the original's, λ = ½."""
    tokenizer, pointing, _ = needle_setup
    samples = build_samples(tokenizer, HAYSTACK, [80], [0.5], num_needles=1, digits=2)
    original = retrieval_probe(load(pointing), samples).trials[0]
    v1 = load(convert(pointing, tmp_path / "v1", negative_init="zero").output_dir)
    set_mix(v1, 1.0)
    lam = diff_attention_modules(v1)[0].lambda_full().item()
    assert abs(lam) > 0.05
    trial = retrieval_probe(v1, samples).trials[0]
    keys = samples[0].question_end
    assert trial.positive_answer_mass[0] == pytest.approx(original.answer_mass[0], rel=1e-5)
    assert trial.negative_answer_mass[0] == pytest.approx(1 / keys, rel=1e-5)
    assert trial.answer_mass[0] == pytest.approx(original.answer_mass[0] - lam / keys, rel=1e-5)
    v2 = load(convert(pointing, tmp_path / "v2", variant="v2").output_dir)
    trial = retrieval_probe(v2, samples).trials[0]
    assert trial.positive_answer_mass[0] == pytest.approx(original.answer_mass[0], rel=1e-5)
    assert trial.negative_answer_mass[0] == pytest.approx(original.answer_mass[0], rel=1e-5)
    assert trial.answer_mass[0] == pytest.approx(0.5 * original.answer_mass[0], rel=1e-5)
    assert trial.correct  # the exact conversion retrieves what the original does


# ---------------------------------------------------------------------------------------------------- quantization


def test_fake_quantize_per_token_by_hand():
    x = torch.tensor([[7.0, -3.2, 0.5, 2.6], [0.0, 0.0, 0.0, 0.0], [-0.7, 0.25, 0.0, 0.1]])
    # 4 bits: 7 levels each side. Row 0: s = 7/7 = 1, round half to even: 7, −3, 0, 3. Row 1 stays 0.
    # Row 2: s = 0.1, x/s = −7, 2.5, 0, 1 → −7, 2, 0, 1.
    expected = torch.tensor([[7.0, -3.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0], [-0.7, 0.2, 0.0, 0.1]])
    torch.testing.assert_close(fake_quantize_per_token(x, 4), expected)
    # 8 bits: 127 levels, row 0: s = 7/127
    torch.testing.assert_close(fake_quantize_per_token(x, 8)[0], torch.round(x[0] * 127 / 7) * 7 / 127)


def hand_weight_quantized(model, bits: int, group: int | None) -> nn.Module:
    """Symmetric weight quantization written out: per output row (group=None) or per `group` input columns,
    s = max|w| / ((2^bits − 1) / 2), q = clamp(round(w · (1/s)), −2^(bits−1), 2^(bits−1) − 1), w' = q·s (w·(1/s) as
    torchao's quantize_affine rounds it: the largest negative weight lands on −127.49999… → −127, not −128)."""
    import copy

    quantized = copy.deepcopy(model)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    with torch.no_grad():
        for layer in quantized.model.layers:
            for linear in [m for m in layer.modules() if isinstance(m, nn.Linear)]:
                w = linear.weight
                grouped = w.reshape(w.shape[0], -1, group or w.shape[1])
                scale = grouped.abs().amax(-1, keepdim=True) / ((high - low) / 2)
                linear.weight.copy_((torch.clamp(torch.round(grouped * (1.0 / scale)), low, high) * scale).reshape(w.shape))
    return quantized


def test_quantization_deltas_match_a_hand_computation():
    model = tiny_llama_model(seed=3)
    blocks = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    result = quantization_probe(model, blocks)
    rows = {row.name: row for row in result.rows}
    base = nn.functional.cross_entropy(model(blocks).logits[:, :-1].flatten(0, 1), blocks[:, 1:].flatten()).item()
    assert result.loss == pytest.approx(base, rel=1e-6)
    for name, bits, group in (("weights int8", 8, None), ("weights int4", 4, 32)):
        hand = hand_weight_quantized(model, bits, group)
        loss = nn.functional.cross_entropy(hand(blocks).logits[:, :-1].flatten(0, 1), blocks[:, 1:].flatten()).item()
        assert rows[name].loss_delta == pytest.approx(loss - base, abs=2e-5), name
        assert rows[name].quantized_linears == 3 * 7 and rows[name].skipped_linears == 0
    assert abs(rows["weights int4"].loss_delta) > 10 * abs(rows["weights int8"].loss_delta)

    class HandQuantizedLinear(nn.Linear):
        bits = 4

        def forward(self, x):
            levels = 2 ** (self.bits - 1) - 1
            scale = x.abs().amax(-1, keepdim=True) / levels
            return nn.functional.linear(torch.clamp(torch.round(x / scale), -levels, levels) * scale, self.weight,
                                        self.bias)

    for bits in (8, 6, 4):
        HandQuantizedLinear.bits = bits
        for layer in model.model.layers:
            for parent in [m for m in layer.modules()]:
                for child_name, child in parent.named_children():
                    if type(child) is nn.Linear or type(child) is HandQuantizedLinear:
                        child.__class__ = HandQuantizedLinear
        loss = nn.functional.cross_entropy(model(blocks).logits[:, :-1].flatten(0, 1), blocks[:, 1:].flatten()).item()
        assert rows[f"activations {bits}-bit"].loss_delta == pytest.approx(loss - base, abs=1e-5), bits


def test_activation_quantization_leaves_the_model_unchanged():
    model = tiny_llama_model(seed=4)
    blocks = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(5))
    before, _ = block_loss(model, blocks)
    with activation_fake_quantization(model, 4):
        during, _ = block_loss(model, blocks)
    after, _ = block_loss(model, blocks)
    assert before == after != during


# ---------------------------------------------------------------------------------------------------- CLI


def test_probe_cli_writes_json_png_and_a_table(tmp_path):
    source = save_tiny_model(tmp_path / "model", "llama", max_position_embeddings=512)
    save_char_tokenizer(source)
    converted = convert(source, tmp_path / "diff", variant="v2").output_dir
    out = tmp_path / "probe"
    result = CliRunner().invoke(main, [
        "probe", str(converted), "--compare", str(source), "--out", str(out), "--lengths", "300,600",
        "--depths", "0.5", "--needles", "2", "--sequence-len", "64", "--max-blocks", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "probe.json").read_text())
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["settings"]["lengths"] == [300]  # 600 is past the context (512)
    diff, original = report["models"]
    assert diff["differential"] and not original["differential"]
    # The conversion is exact, so everything measured on outputs agrees; the positive map is the original's.
    assert diff["quantization"]["loss"] == pytest.approx(original["quantization"]["loss"], rel=1e-5)
    assert diff["retrieval"]["components"]["positive_answer_mass"] == pytest.approx(
        original["retrieval"]["answer_mass"], rel=1e-4)
    for a, b in zip(diff["outliers"], original["outliers"]):
        assert a["residual"]["max_abs"] == pytest.approx(b["residual"]["max_abs"], rel=1e-4)
    assert "multi-needle retrieval" in result.output and "weights int4" in result.output
    assert math.isfinite(report["models"][0]["outliers"][0]["attention"]["kurtosis"])


@pytest.mark.parametrize("arguments, message", [
    (["--probes", "noise"], "unknown probe 'noise': choose from outliers, retrieval, quantization"),
    (["--lengths", "a,b"], "--lengths 'a,b' is not a comma-separated list of numbers"),
    (["--depths", "1.5"], "--depths 1.5: every depth must be between 0 and 1"),
    (["--lengths", "4000", "--probes", "retrieval"], "no retrieval length fits the model's context (512 tokens)"),
])
def test_probe_cli_errors(tmp_path, arguments, message):
    source = save_tiny_model(tmp_path / "model", "llama", max_position_embeddings=512)
    save_char_tokenizer(source)
    result = CliRunner().invoke(main, ["probe", str(source), "--out", str(tmp_path / "out"), *arguments])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_report_json_round_trip(tmp_path):
    from netmorph.probes import ProbeReport, ProbeSettings, probe_model, report_from_dict

    source = save_tiny_model(tmp_path / "model", "llama", max_position_embeddings=512)
    tokenizer = save_char_tokenizer(source)
    from transformers import AutoTokenizer

    settings = ProbeSettings(texts={"t": HAYSTACK}, sequence_len=32, max_blocks=1, lengths=(300,), depths=(0.5,),
                             needles=2)
    report = ProbeReport({}, [probe_model(load(source), AutoTokenizer.from_pretrained(str(tokenizer)), settings, "m")])
    again = report_from_dict(json.loads(report.to_json()))
    assert again.table() == report.table()
    assert again.to_json() == report.to_json()


def test_quantization_rows_say_which_share_of_the_weights_they_quantized():
    """A dense model: every weight of its layers is in an nn.Linear (fraction 1). Mixtral: the experts are one 3-D
    tensor per layer in transformers 5 and the router is its own module, so the rows quantize the attention only; the
    fraction is checked against a count made here from the parameter names, and the table says it."""
    from tests.family_models import family_config, classes

    blocks = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(0))
    dense = quantization_probe(tiny_llama_model(seed=1), blocks, activation_bits=(8,))
    assert [row.quantized_fraction for row in dense.rows] == [1.0, 1.0, 1.0]

    torch.manual_seed(0)
    _, model_class = classes("Mixtral")
    moe = model_class(family_config("mixtral", vocab_size=97)).eval()
    layer_weights = {name: p.numel() for name, p in moe.model.layers.named_parameters() if p.dim() >= 2}
    assert any("experts" in name for name in layer_weights)
    linear = sum(n for name, n in layer_weights.items() if "self_attn" in name)  # router and experts: not nn.Linear
    result = quantization_probe(moe, blocks, activation_bits=(8,))
    rows = {row.name: row for row in result.rows}
    for name in ("weights int8", "activations 8-bit"):
        assert rows[name].quantized_fraction == pytest.approx(linear / sum(layer_weights.values())), name
        assert 0 < rows[name].quantized_fraction < 0.8
    # no linear's input width (hidden 36, heads × head_dim) is a multiple of int4's group of 32: int4 changes nothing
    assert rows["weights int4"].quantized_fraction == 0 and rows["weights int4"].quantized_linears == 0
    assert rows["weights int4"].skipped_linears == 4 * moe.config.num_hidden_layers
    from netmorph.probes import ModelProbes, ProbeReport

    table = ProbeReport({}, [ModelProbes(model="moe", differential=False, quantization=result)]).table()
    fraction = rows["weights int8"].quantized_fraction
    assert f"weights int8 quantized {fraction:.1%} of the decoder layers' weights" in table
    assert [line.split()[-2:] for line in table.splitlines() if line.startswith("weights int4")] == [["none", "quantized"]]
