"""CLI behaviour around errors that the README table (tests/test_error_table.py) does not cover row by row:
--force, failures after writing began, YAML sources, sharding."""

import json

import pytest
from click.testing import CliRunner

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


def test_non_empty_output_dir_needs_force(tmp_path, tiny_llama):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_clean_error(run_cli("convert-diff-transformer", tiny_llama, "-o", out), "--force")
    assert (out / "keep.txt").read_text() == "precious"
    assert run_cli("convert-diff-transformer", tiny_llama, "-o", out, "--force", "--no-verify").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


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
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_netmorph_diff.NetmorphDiffLlamaForCausalLM"
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

def test_help_and_argument_errors_import_neither_torch_nor_transformers():
    """`netmorph --help` and a flag error answer at once: the heavy imports happen where a model is loaded."""
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from netmorph.cli import main; "
            "r1 = CliRunner().invoke(main, ['--help']); r2 = CliRunner().invoke(main, ['grow', '--seed', 'x']); "
            "print(r1.exit_code, r2.exit_code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["0", "2", "False", "False"], result.stdout + result.stderr
