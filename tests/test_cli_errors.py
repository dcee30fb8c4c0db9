"""Bad input: one clear line on stderr, exit status 2, nothing at the output path."""

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import GPT2Config, GPT2LMHeadModel

from netmorph.cli import main


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_clean_error(result, *words, output=None):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in lines[0], lines[0]
    if output is not None:
        assert not output.exists() or not any(output.iterdir())
        siblings = [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
        assert not siblings, siblings


def test_unsupported_architecture_names_supported_ones(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "out"
    assert_clean_error(run_cli("convert-diff-transformer", tmp_path / "gpt2", "-o", out),
                       "'gpt2'", "llama, mistral, qwen2", output=out)


def test_split_heads_with_odd_heads(tmp_path, tiny_llama):
    out = tmp_path / "out"
    assert_clean_error(run_cli("convert-diff-transformer", tiny_llama, "-o", out, "--split-heads"),
                       "--split-heads", "9 query and 3 KV", output=out)


def test_zero_init_with_mirror_weights(tmp_path, tiny_llama):
    out = tmp_path / "out"
    assert_clean_error(run_cli("convert-diff-transformer", tiny_llama, "-o", out, "--zero-init", "--mirror-weights"),
                       "--zero-init", "--mirror-weights", output=out)


def test_non_empty_output_dir_needs_force(tmp_path, tiny_llama):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_clean_error(run_cli("convert-diff-transformer", tiny_llama, "-o", out), "--force")
    assert (out / "keep.txt").read_text() == "precious"
    assert run_cli("convert-diff-transformer", tiny_llama, "-o", out, "--force", "--no-verify").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_output_inside_input(tiny_llama):
    assert_clean_error(run_cli("convert-diff-transformer", tiny_llama, "-o", tiny_llama / "converted"), "inside the input")
    assert not (tiny_llama / "converted").exists()


def test_missing_source(tmp_path):
    out = tmp_path / "out"
    assert_clean_error(run_cli("convert-diff-transformer", tmp_path / "nope", "-o", out), "does not exist", output=out)


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage-header"])
def test_corrupt_safetensors(tmp_path, tiny_llama, damage):
    weights = tiny_llama / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garbage-header": b"\x10\0\0\0\0\0\0\0{not json!!!!!!"}[damage])
    out = tmp_path / "out"
    assert_clean_error(run_cli("convert-diff-transformer", tiny_llama, "-o", out), "safetensors", "re-download", output=out)


def test_index_pointing_at_missing_shard(tmp_path, tiny_llama):
    (tiny_llama / "model.safetensors").rename(tiny_llama / "model-00001-of-00002.safetensors")
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}
    (tiny_llama / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "out"
    assert_clean_error(run_cli("convert-diff-transformer", tiny_llama, "-o", out), "missing safetensors shard", output=out)


def test_shape_disagreeing_with_config(tmp_path, tiny_llama):
    config = json.loads((tiny_llama / "config.json").read_text())
    config["head_dim"] = 4
    (tiny_llama / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_clean_error(run_cli("convert-diff-transformer", tiny_llama, "-o", out), "shape", "config.json", output=out)


def test_pickle_only_checkpoint_is_refused_then_loaded_safely_when_allowed(tmp_path, tiny_llama):
    from safetensors.torch import load_file

    state = load_file(tiny_llama / "model.safetensors")
    (tiny_llama / "model.safetensors").unlink()
    torch.save(state, tiny_llama / "pytorch_model.bin")
    out = tmp_path / "out"
    assert_clean_error(run_cli("convert-diff-transformer", tiny_llama, "-o", out), "pickle", "--allow-pickle", output=out)
    result = run_cli("convert-diff-transformer", tiny_llama, "-o", out, "--allow-pickle", "--no-verify")
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists()


def test_remote_code_source_is_refused(tmp_path, tiny_llama):
    config = json.loads((tiny_llama / "config.json").read_text())
    config.update(model_type="my_custom_llama", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (tiny_llama / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_clean_error(run_cli("convert-diff-transformer", tiny_llama, "-o", out), "--trust-remote-code", output=out)


def test_yaml_with_wrong_type_names_the_key(tmp_path, tiny_llama):
    config = tmp_path / "train.yml"
    config.write_text(f"base_model: {tiny_llama}\ndiff_attn_warmup_steps: lots\n")
    out = tmp_path / "out"
    assert_clean_error(run_cli("convert-diff-transformer", config, "-o", out), "diff_attn_warmup_steps", output=out)


def test_yaml_with_unknown_diff_key(tmp_path, tiny_llama):
    config = tmp_path / "train.yml"
    config.write_text(f"base_model: {tiny_llama}\ndiff_attn_warmup_step: 10\n")
    assert_clean_error(run_cli("convert-diff-transformer", config, "-o", tmp_path / "out"), "diff_attn_warmup_step'")


def test_failure_during_write_leaves_nothing(tmp_path, tiny_llama, monkeypatch):
    """An exception after shards were written (here: in the tokenizer step) removes the temp dir."""
    from netmorph import sources

    def boom(self, destination):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(sources.Source, "save_tokenizer", boom)
    out = tmp_path / "nested" / "out"
    with pytest.raises(RuntimeError):
        run_cli("convert-diff-transformer", tiny_llama, "-o", out, "--no-verify")
    assert not (tmp_path / "nested").exists()


def test_yaml_source_writes_training_config(tmp_path, tiny_llama):
    import yaml

    config = tmp_path / "train.yml"
    config.write_text(
        f"base_model: {tiny_llama}\noutput_dir: {tmp_path / 'runs'}\nlearning_rate: 0.0003\n"
        "plugins: [some.other.Plugin]\ndiff_attn_warmup_steps: 100\n"
    )
    out = tmp_path / "out"
    result = run_cli("convert-diff-transformer", config, "-o", out, "--no-verify")
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((out / "config.yml").read_text())
    assert written["base_model"] == str(out.resolve())
    assert written["plugins"] == ["some.other.Plugin", "netmorph.integrations.axolotl.DifferentialTransformerPlugin"]
    assert written["diff_attention"] is True
    assert written["learning_rate"] == 0.0003 and written["diff_attn_warmup_steps"] == 100
    assert written["output_dir"] == str(tmp_path / "runs")
    saved = json.loads((out / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_netmorph_diff.NetmorphDiffForCausalLM"
    assert (out / "modeling_netmorph_diff.py").exists() and (out / "configuration_netmorph_diff.py").exists()


def test_large_checkpoint_is_sharded_with_index(tmp_path, tiny_llama):
    out = tmp_path / "out"
    result = run_cli("convert-diff-transformer", tiny_llama, "-o", out, "--no-verify", "--max-shard-size", "4KB")
    assert result.exit_code == 0, result.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).exists() for s in shards)
    assert not (out / "model.safetensors").exists()
    from tests.helpers import load, max_logit_diff, random_ids

    assert max_logit_diff(load(tiny_llama), load(out), random_ids()) <= 1e-5


def test_same_seed_same_bytes(tmp_path, tiny_llama):
    for name in ("a", "b"):
        assert run_cli("convert-diff-transformer", tiny_llama, "-o", tmp_path / name, "--no-verify", "--seed", 7).exit_code == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert run_cli("convert-diff-transformer", tiny_llama, "-o", tmp_path / "c", "--no-verify", "--seed", 8).exit_code == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()
