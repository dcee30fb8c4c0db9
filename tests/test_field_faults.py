"""Fault classes from public bug reports of converters, mergers and trainers, each tested over its class:

1. half-precision checkpoints under recipes that rescale weights (every grow recipe × bf16/fp16/fp32 × the families
   whose recipes differ; convert and qkv-layout on bf16/fp16);
2. config.json written the way real checkpoints write it (keys absent, null, legacy names);
3. tokenizers of every kind the output must carry (WordPiece vocab.txt, slow BPE vocab.json + merges.txt, a fast
   tokenizer.json), and a verification that notices a broken one;
4. context limits (learned absolute positions, a short max_position_embeddings);
5. the dtype a fine-tune saves in, and precision flags the hardware cannot honour;
plus stale buffers in old checkpoints. The one-line errors of these classes are rows of tests/test_error_table.py.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from netmorph.cli import main
from tests.family_models import save_family_model
from tests.grow_helpers import save_tiny as save_grow_source
from tests.helpers import save_char_tokenizer, save_tiny_model

CONVERT = "convert-diff-transformer"


def run(*args) -> tuple[int, str]:
    """The CLI in-process; a traceback (an exception that is not a clean exit) fails the test."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def stored_dtypes(directory: Path) -> set[torch.dtype]:
    return {tensor.dtype for file in directory.glob("*.safetensors") for tensor in load_file(file).values()}


def as_dtype(source: Path, directory: Path, dtype: torch.dtype) -> Path:
    """The checkpoint at `source` saved in `dtype`, with its tokenizer."""
    AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).to(dtype).save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(directory)
    return directory


# ── 1. half precision ────────────────────────────────────────────────────────────────────────────────────────────

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# The families whose recipes differ: RMSNorm zero-fill (llama), LayerNorm mean-fill + partial rotary (stablelm),
# whole copies of the residual stream (qwen3), learned positions + layer-index score scaling (gpt2).
RECIPES = {
    "llama": {"hidden": ["--hidden-size", "48"], "head_dim": ["--head-dim", "12"],
              "heads+depth+mlp": ["--num-attention-heads", "8", "--num-key-value-heads", "4", "--num-layers", "3",
                                  "--intermediate-size", "64"]},
    "stablelm": {"hidden": ["--hidden-size", "80"], "head_dim": ["--head-dim", "20", "--hidden-size", "80"]},
    "qwen3": {"hidden": ["--hidden-size", "64"]},
    "gpt2": {"depth (moves the layer-index scale)": ["--num-layers", "3", "--new-layers-at", "0"]},
}
GROW_SOURCES = {"llama": dict(hidden_size=32, head_dim=8, num_attention_heads=4, num_key_value_heads=2),
                "gpt2": dict(scale_attn_by_inverse_layer_idx=True)}
GROW_CASES = [(family, recipe, dtype) for family, recipes in RECIPES.items() for recipe in recipes for dtype in DTYPES]


@pytest.fixture(scope="module")
def grow_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("half-sources")
    sources = {}
    for family in RECIPES:
        fp32 = save_char_tokenizer(save_grow_source(root / family, family, **GROW_SOURCES.get(family, {})))
        for name, dtype in DTYPES.items():
            sources[family, name] = fp32 if dtype == torch.float32 else as_dtype(fp32, root / f"{family}-{name}", dtype)
    return sources


@pytest.mark.parametrize("family,recipe,dtype", GROW_CASES)
def test_every_grow_recipe_in_every_dtype_passes_its_stated_verification(grow_sources, tmp_path, family, recipe,
                                                                         dtype):
    """A grown half-precision checkpoint keeps the source's dtype; a recipe that rescales weights is verified against
    the source's own rounding in that dtype (stated in the report), every other recipe against 1e-4 (float64)."""
    out = tmp_path / "out"
    code, output = run("grow", grow_sources[family, dtype], "-o", out, *RECIPES[family][recipe])
    assert code == 0, output
    assert stored_dtypes(out) == {DTYPES[dtype]}
    header = next(line for line in output.splitlines() if "tolerance:" in line)
    rescales = recipe in ("hidden", "head_dim") or recipe.startswith("depth (moves")
    if rescales and dtype != "float32":
        assert f"2 × the source's own {dtype} rounding" in header, header
    else:
        assert "≤ 0.0001 (float64)" in header and "rounding" not in header, header
    assert "PASS" in output
    assert "Generations match" in output or (rescales and dtype != "float32" and "(not required" in output)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_float32_writes_a_half_source_grown_exactly(grow_sources, tmp_path, dtype):
    out = tmp_path / "out"
    code, output = run("grow", grow_sources["llama", dtype], "-o", out, "--hidden-size", "48", "--dtype", "float32")
    assert code == 0, output
    assert stored_dtypes(out) == {torch.float32}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert "≤ 0.0001 (float64)" in output and "PASS" in output


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("command", [[CONVERT], [CONVERT, "--variant", "v2"], [CONVERT, "--split-heads"],
                                     [CONVERT, "--export", "diffllama"], ["qkv-layout", "--to", "sequential"]],
                         ids=["doubled", "v2", "split", "diffllama", "qkv-sequential"])
def test_convert_and_qkv_layout_of_half_sources(tmp_path, command, dtype):
    """Copies and permutations are exact in any dtype: the exact modes pass at the default tolerance and keep the
    source's dtype; the approximate ones (split heads, the DiffLlama export) report and exit 0."""
    fp32 = save_char_tokenizer(save_tiny_model(tmp_path / "fp32", "llama", num_attention_heads=6,
                                               num_key_value_heads=2, head_dim=6, attention_bias=False))
    source = as_dtype(fp32, tmp_path / "src", DTYPES[dtype])
    code, output = run(command[0], source, "-o", tmp_path / "out", *command[1:])
    assert code == 0, output
    assert DTYPES[dtype] in stored_dtypes(tmp_path / "out")
    assert ("approximate mode" in output) == (command[-1] in ("--split-heads", "diffllama"))
    assert "→ PASS" in output or "approximate mode" in output


# ── 2. config.json as real checkpoints write it ──────────────────────────────────────────────────────────────────

def real_world_forms(config: dict) -> dict[str, dict]:
    """The same config, written the ways real config.json files write it."""
    forms = {}
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if config.get("head_dim") and heads and hidden and config["head_dim"] * heads == hidden:
        forms["head_dim absent"] = {k: v for k, v in config.items() if k != "head_dim"}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:  # the pre-5.0 spelling
        legacy = {k: v for k, v in config.items() if k != "rope_parameters"}
        legacy.update(rope_theta=rope["rope_theta"], rope_scaling=None)
        if "partial_rotary_factor" in rope:
            legacy["partial_rotary_factor"] = rope["partial_rotary_factor"]
        forms["legacy rope_theta"] = legacy
    if "layer_types" in config:
        forms["layer_types absent"] = {k: v for k, v in config.items() if k != "layer_types"}
    if "dtype" in config:
        forms["torch_dtype"] = {**{k: v for k, v in config.items() if k != "dtype"}, "torch_dtype": config["dtype"]}
    return forms


FAMILY_SOURCES = {
    "llama": lambda d: save_tiny_model(d, "llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=8),
    # Qwen2 the way Qwen2.5 ships it: a sliding_window value, switched off by use_sliding_window
    "qwen2": lambda d: save_tiny_model(d, "qwen2", hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=8, use_sliding_window=False, sliding_window=4096, max_window_layers=21),
    "phi3": lambda d: save_family_model(d, "phi3"),
    "gpt_neox": lambda d: save_family_model(d, "gpt_neox"),
    "gemma2": lambda d: save_family_model(d, "gemma2"),
    "falcon": lambda d: save_family_model(d, "falcon"),
}
COMMANDS = {"convert": [CONVERT], "grow": ["grow", "--num-layers", "3"], "qkv-layout": ["qkv-layout", "--to",
                                                                                        "sequential",
                                                                                        "--allow-non-stock"]}


@pytest.mark.parametrize("family", FAMILY_SOURCES)
def test_configs_written_like_real_checkpoints_run_every_command(tmp_path, family):
    """Every real-world form of each family's config: every command exits 0 (exact, verified) — no traceback."""
    base = save_char_tokenizer(FAMILY_SOURCES[family](tmp_path / "base"))
    config = json.loads((base / "config.json").read_text())
    forms = real_world_forms(config)
    assert forms, "no real-world form of this config"
    for form, written in forms.items():
        source = tmp_path / form.replace(" ", "-")
        source.mkdir()
        for file in base.iterdir():
            (source / file.name).write_bytes(file.read_bytes())
        (source / "config.json").write_text(json.dumps(written))
        for command, args in COMMANDS.items():
            out = tmp_path / f"{source.name}-{command}"
            code, output = run(args[0], source, "-o", out, *args[1:])
            assert code == 0, f"{family}, {form}, {command}: {output}"


# ── 3. tokenizers of every kind ──────────────────────────────────────────────────────────────────────────────────

CHARACTERS = [chr(c) for c in range(33, 126)]  # the tiny models' 97-token vocabulary, minus specials


def wordpiece_files(directory: Path) -> None:
    """A BERT WordPiece tokenizer as vocab.txt + tokenizer_config.json only (no tokenizer.json): characters, and
    the word-continuing characters (`##e`) of the letters."""
    letters = [c for c in CHARACTERS if c.isalnum()]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + CHARACTERS + [f"##{c}" for c in letters]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                                 "do_lower_case": False}))


def bpe_files(directory: Path) -> None:
    """A slow GPT-2 byte-level BPE tokenizer as vocab.json + merges.txt + tokenizer_config.json."""
    # GPT-2's byte → printable-character table: printable bytes stand for themselves, the rest map above 255.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [byte for byte in range(256) if byte not in printable]
    symbols = [chr(byte) for byte in printable] + [chr(256 + i) for i in range(len(others))]
    vocab = {"<|endoftext|>": 0, **{symbol: i + 1 for i, symbol in enumerate(symbols)}}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))


VOCAB_SIZE = 260  # every token id of the tokenizers below (GPT-2's byte table has 256 + 1)
TOKENIZERS = {"wordpiece vocab.txt": wordpiece_files, "slow bpe vocab.json+merges.txt": bpe_files,
              "fast tokenizer.json": save_char_tokenizer}


@pytest.mark.parametrize("kind", TOKENIZERS)
@pytest.mark.parametrize("command", COMMANDS)
def test_every_tokenizer_kind_reaches_the_output_and_is_checked(tmp_path, kind, command):
    source = save_family_model(tmp_path / "src", "gpt2", vocab_size=VOCAB_SIZE)
    TOKENIZERS[kind](source)
    sample = "The quick brown fox jumps over the lazy dog 12345."
    expected = AutoTokenizer.from_pretrained(str(source))(sample).input_ids
    assert len(set(expected)) > 5, "the source tokenizer should tell characters apart"
    out = tmp_path / "out"
    args = COMMANDS[command]
    code, output = run(args[0], source, "-o", out, *args[1:])
    assert code == 0, output
    assert AutoTokenizer.from_pretrained(str(out))(sample).input_ids == expected
    if command != "qkv-layout":  # GPT-2 → sequential is GPT-2's own layout: nothing to verify there
        assert "tokenizer: the output's encodes every text and prompt to the source's ids" in output


def test_a_broken_output_tokenizer_fails_the_proof(tmp_path, monkeypatch):
    """The check itself: an output that lost vocab.txt (its tokenizer maps everything to [UNK], or does not load)."""
    import netmorph.sources

    source = save_family_model(tmp_path / "src", "gpt2", vocab_size=VOCAB_SIZE)
    wordpiece_files(source)
    monkeypatch.setattr(netmorph.sources, "NOT_CARRIED", (*netmorph.sources.NOT_CARRIED, "vocab.txt"))
    code, output = run(CONVERT, source, "-o", tmp_path / "out")
    assert code == 1, output
    assert output.strip().splitlines()[-1] == ("FAILED: the output's tokenizer encodes the verification text "
                                               "differently from the source's")


# ── 4. context limits ────────────────────────────────────────────────────────────────────────────────────────────

CONTEXTS = {"learned positions (gpt2 n_positions 64)": lambda d: save_family_model(d, "gpt2", n_positions=64),
            "rope, max_position_embeddings 40": lambda d: save_tiny_model(d, "llama", max_position_embeddings=40)}


@pytest.mark.parametrize("kind", CONTEXTS)
def test_every_command_respects_the_models_context(tmp_path, kind, caplog):
    source = save_char_tokenizer(CONTEXTS[kind](tmp_path / "src"))
    limit = json.loads((source / "config.json").read_text()).get("n_positions") or 40
    for args in ([CONVERT], ["grow", "--num-layers", "3"], ["qkv-layout", "--to", "sequential",
                                                             "--allow-non-stock"]):
        with caplog.at_level("INFO", logger="netmorph"):
            code, output = run(args[0], source, "-o", tmp_path / args[0], *args[1:])
        assert code == 0, output
    assert f"the model's context is {limit} tokens, so {limit} are used instead of 512" in caplog.text
    code, output = run("verify", source, tmp_path / CONVERT)
    assert code == 0, output
    assert f"{limit:>7}" in output  # the table's token count is the context
    data = tmp_path / "data.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    code, output = run("evaluate", tmp_path / CONVERT, "--dataset", data, "--sequence-len", "512")
    assert code == 0, output


# ── 5. the dtype a fine-tune saves in ────────────────────────────────────────────────────────────────────────────

@pytest.fixture(scope="module")
def bf16_converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16-train")
    fp32 = save_char_tokenizer(save_tiny_model(root / "fp32", "llama"))
    source = as_dtype(fp32, root / "bf16", torch.bfloat16)
    code, output = run(CONVERT, source, "-o", root / "diff")
    assert code == 0, output
    (root / "data.txt").write_text("The quick brown fox jumps over the lazy dog. " * 60)
    return root


@pytest.mark.parametrize("keys,saved", [({}, torch.bfloat16), ({"float32": True}, torch.float32),
                                        ({"bf16": True}, torch.bfloat16), ({"bfloat16": True}, torch.bfloat16)],
                         ids=["default", "float32", "bf16-autocast", "bfloat16"])
def test_training_saves_in_the_base_models_dtype_unless_told(bf16_converted, tmp_path, keys, saved, caplog):
    config = yaml.safe_load((bf16_converted / "diff" / "config.yml").read_text())
    config.update(datasets=[{"path": str(bf16_converted / "data.txt"), "type": "completion"}], test_datasets=None,
                  sequence_len=32, max_steps=2, output_dir=str(tmp_path / "run"), logging_steps=1, **keys)
    path = tmp_path / "train.yml"
    path.write_text(yaml.safe_dump(config))
    with caplog.at_level("INFO", logger="netmorph"):
        code, output = run("train", path, "--no-progress")
    assert code == 0, output
    assert stored_dtypes(tmp_path / "run") == {saved}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dtype"] == str(saved).removeprefix("torch.")
    assert f"saving the model in {str(saved).removeprefix('torch.')}" in caplog.text
    if keys.get("bf16") and not torch.cuda.is_available():
        assert "CPU bf16 autocast" in caplog.text


# ── stale buffers of old checkpoints ─────────────────────────────────────────────────────────────────────────────

def test_stale_rotary_buffers_are_ignored_by_every_command(tmp_path):
    source = save_char_tokenizer(save_tiny_model(tmp_path / "src", "llama"))
    state = load_file(source / "model.safetensors")
    for layer in range(2):
        state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.rand(4)
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    for args in ([CONVERT], ["grow", "--hidden-size", "54"], ["qkv-layout", "--to", "sequential", "--allow-non-stock"]):
        out = tmp_path / args[0]
        code, output = run(args[0], source, "-o", out, *args[1:])
        assert code == 0, output
        assert not any("inv_freq" in name for file in out.glob("*.safetensors") for name in load_file(file))


# ── faults found by reading the code (docstring review) ─────────────────────────────────────────────────────────


def test_evaluate_compare_with_a_weights_only_directory_uses_the_first_tokenizer(tmp_path):
    """A compared model without tokenizer files is evaluated on the first model's tokens (it used to fail: the
    fallback caught ValueError/OSError while loading raises NetmorphError)."""
    import shutil

    from netmorph.sources import default_text_files
    from tests.helpers import convert

    save_tiny_model(tmp_path / "tiny", "llama")
    save_char_tokenizer(tmp_path / "tiny")
    convert(tmp_path / "tiny", tmp_path / "diff")
    (tmp_path / "weights").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tmp_path / "tiny" / name, tmp_path / "weights" / name)
    code, output = run("evaluate", tmp_path / "diff", "--compare", tmp_path / "weights", "--dataset",
                       default_text_files()[0], "--sequence-len", 32, "--max-blocks", 4, "--json")
    assert code == 0, output
    report = json.loads(output)
    assert abs(report["loss_delta"]) <= 1e-4  # an exact conversion against its own source, same tokens


def test_converted_config_names_the_weights_dtype_not_the_first_header_entry(tmp_path):
    """safetensors lists wider dtypes first: one fp32 tensor in a bf16 checkpoint used to make config.json say
    float32 (and the stock class then loads the whole model in fp32)."""
    source = save_tiny_model(tmp_path / "src", "llama")
    tensors = load_file(source / "model.safetensors")
    tensors = {name: (t if name == "model.norm.weight" else t.to(torch.bfloat16)) for name, t in tensors.items()}
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    code, output = run(CONVERT, source, "-o", tmp_path / "out", "--no-verify")
    assert code == 0, output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_grown_config_names_the_weights_dtype_not_the_embeddings(tmp_path):
    """grow read the dtype from the embedding alone: an fp32 embedding in a bf16 checkpoint made config.json say
    float32. Each tensor keeps its own stored dtype (no --dtype), and the grown model stays exact."""
    source = save_char_tokenizer(save_grow_source(tmp_path / "src", "llama"))
    tensors = load_file(source / "model.safetensors")
    tensors = {name: (t if name == "model.embed_tokens.weight" else t.to(torch.bfloat16)) for name, t in tensors.items()}
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    code, output = run("grow", source, "-o", tmp_path / "out", "--num-layers", 4)
    assert code == 0, output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    grown = load_file(tmp_path / "out" / "model.safetensors")
    assert grown["model.embed_tokens.weight"].dtype == torch.float32
    assert {t.dtype for name, t in grown.items() if name != "model.embed_tokens.weight"} == {torch.bfloat16}


def test_grow_of_an_untied_checkpoint_without_its_head_is_one_line(tmp_path):
    source = save_grow_source(tmp_path / "src", "llama", tie_word_embeddings=False)
    tensors = load_file(source / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    for extra in (["--num-layers", "3"], ["--num-layers", "4", "--hidden-size", "72"]):
        code, output = run("grow", source, "-o", tmp_path / f"out{len(extra)}", "--no-verify", *extra)
        assert code == 2 and output.strip().splitlines()[-1] == (
            "error: the checkpoint has no lm_head.weight but config.json says the embeddings are not tied: it is "
            "incomplete"), output
        assert not (tmp_path / f"out{len(extra)}").exists()


def test_a_header_whose_byte_span_disagrees_with_the_shape_is_one_line(tmp_path):
    source = save_tiny_model(tmp_path / "src", "llama")
    path = source / "model.safetensors"
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    header["model.norm.weight"]["shape"] = [header["model.norm.weight"]["shape"][0] // 2]
    encoded = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)  # same length: only the shape differs
    path.write_bytes(data[:8] + encoded + data[8 + header_len:])
    code, output = run(CONVERT, source, "-o", tmp_path / "out", "--no-verify")
    assert code == 2
    assert output.strip().startswith(f"error: corrupt safetensors header in {path}: model.norm.weight spans"), output


def test_a_training_yaml_that_cannot_be_read_is_one_line(tmp_path):
    (tmp_path / "config.yml").mkdir()  # a directory where the YAML file should be
    code, output = run("train", tmp_path / "config.yml")
    assert code == 2 and output.startswith("error: ") and len(output.strip().splitlines()) == 1, output


# ── faults found by a newcomer's attack on the new commands ──────────────────────────────────────────────────────


def one_error_line(code: int, output: str) -> bool:
    lines = output.strip().splitlines()
    return code == 2 and len(lines) == 1 and lines[0].startswith("error: ")


def test_probe_refuses_a_tokenizer_larger_than_the_model_vocabulary(tmp_path):
    save_tiny_model(tmp_path / "small", "llama", vocab_size=50)  # the character tokenizer has 97 tokens
    save_char_tokenizer(tmp_path / "small")
    code, output = run("probe", tmp_path / "small", "--probes", "outliers", "--out", tmp_path / "out")
    assert one_error_line(code, output) and "50 token embeddings but the tokenizer has" in output, output


def test_a_path_the_file_system_refuses_is_one_line(tmp_path):
    save_tiny_model(tmp_path / "tiny", "llama")
    save_char_tokenizer(tmp_path / "tiny")
    (tmp_path / "a-file").write_text("x")
    code, output = run("probe", tmp_path / "tiny", "--probes", "outliers", "--sequence-len", 32, "--max-blocks", 1,
                       "--out", tmp_path / "a-file")
    assert one_error_line(code, output) and "a-file" in output, output


def test_train_max_steps_must_be_positive(tmp_path):
    for steps in ("0", "-1"):
        code, output = run("train", tmp_path / "config.yml", "--max-steps", steps)
        assert one_error_line(code, output) and "--max-steps" in output, output


def test_a_family_without_sdpa_is_evaluated_with_eager_attention(tmp_path):
    """GPT-OSS has no SDPA path (its sinks): evaluate used to raise transformers' ValueError as a traceback."""
    from netmorph.sources import default_text_files

    source = save_family_model(tmp_path / "gpt_oss", "gpt_oss", vocab_size=97)
    save_char_tokenizer(source)
    code, output = run("evaluate", source, "--dataset", default_text_files()[0], "--sequence-len", 32,
                       "--max-blocks", 2, "--json")
    assert code == 0, output
    assert json.loads(output)["results"][0]["loss"] > 0


# ── options that were accepted and then ignored, and a probe write that could be half done ───────────────────────────


@pytest.mark.parametrize("flags", [["--negative-init", "zero"], ["--negative-init", "mirror"], ["--variant", "v2"],
                                   ["--split-heads"]])
def test_negative_std_where_no_normal_init_is_drawn_is_refused(tiny_llama, tmp_path, flags):
    code, output = run(CONVERT, tiny_llama, "--output-dir", tmp_path / "out", "--negative-std", "0.5", *flags)
    assert one_error_line(code, output) and "--negative-std" in output and flags[0] in output, output
    assert not (tmp_path / "out").exists()


def tiny_training_yaml(tmp_path, **keys) -> Path:
    save_tiny_model(tmp_path / "tiny", "llama")
    save_char_tokenizer(tmp_path / "tiny")
    (tmp_path / "train.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    config = {"base_model": str(tmp_path / "tiny"), "datasets": [{"path": str(tmp_path / "train.txt")}],
              "sequence_len": 32, "max_steps": 2, "output_dir": str(tmp_path / "run"), **keys}
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    return tmp_path / "config.yml"


@pytest.mark.parametrize("keys,named", [({"deepspeed": ""}, "deepspeed is empty"), ({"deepspeed": {}}, "deepspeed is empty"),
                                        ({"fsdp_version": 2}, "fsdp_version 2 without fsdp_config")])
def test_a_distributed_key_that_would_train_plain_is_refused(tmp_path, keys, named):
    code, output = run("train", tiny_training_yaml(tmp_path, **keys))
    assert one_error_line(code, output) and named in output, output


def test_resume_without_a_checkpoint_is_refused_before_training(tmp_path):
    config = tiny_training_yaml(tmp_path)
    run_dir = tmp_path / "run"
    code, output = run("train", config, "--resume")
    assert one_error_line(code, output) and "no checkpoint-N folder" in output, output
    assert not run_dir.exists()
    (run_dir / "checkpoint-notes").mkdir(parents=True)  # stray names, and a step folder without trainer_state.json
    (run_dir / "checkpoint-3").mkdir()
    (run_dir / "checkpoint-4.txt").write_text("x")
    code, output = run("train", config, "--resume")
    assert one_error_line(code, output) and "no checkpoint-N folder" in output, output
    text = config.read_text()
    # '' used to pass as "." (a folder); "." and a folder without trainer_state.json reached the Trainer's traceback
    for value in ("''", ".", str(tmp_path / "tiny"), str(run_dir / "checkpoint-9")):
        config.write_text(text + f"resume_from_checkpoint: {value}\n")
        code, output = run("train", config)
        assert one_error_line(code, output) and "is not a Trainer checkpoint folder" in output, (value, output)


def test_a_failed_probe_leaves_the_earlier_results_whole(tmp_path, monkeypatch):
    import netmorph.plot

    save_tiny_model(tmp_path / "tiny", "llama")
    save_char_tokenizer(tmp_path / "tiny")
    out = tmp_path / "out"
    out.mkdir()
    (out / "probe.json").write_text("earlier")

    def broken_plot(report, output):
        Path(output).write_bytes(b"half a png")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(netmorph.plot, "plot_probes", broken_plot)
    code, output = run("probe", tmp_path / "tiny", "--probes", "outliers", "--sequence-len", 32, "--max-blocks", 1,
                       "--out", out)
    assert one_error_line(code, output) and "No space left" in output, output
    assert sorted(p.name for p in out.iterdir()) == ["probe.json"] and (out / "probe.json").read_text() == "earlier"


@pytest.mark.parametrize("command", ["verify", "probe"])
@pytest.mark.parametrize("content,named", [(b"PK\x03\x04\xff\xfe binary", "is not UTF-8 text (byte 4 is 0xff)"),
                                           (b"  \n", "is empty")])
def test_a_text_file_that_is_not_text_is_refused(tmp_path, command, content, named):
    """--text used to be read with errors="replace": an archive or a model file was measured as replacement characters."""
    save_tiny_model(tmp_path / "tiny", "llama")
    save_char_tokenizer(tmp_path / "tiny")
    (tmp_path / "text.bin").write_bytes(content)
    args = [tmp_path / "tiny"] * (2 if command == "verify" else 1)
    code, output = run(command, *args, "--text", tmp_path / "text.bin")
    assert one_error_line(code, output) and named in output and "text.bin" in output, output
