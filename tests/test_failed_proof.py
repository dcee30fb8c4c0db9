"""A failed proof fails the command. When an exact mode's verification finds logits over the tolerance or a greedy
generation that differs, convert-diff-transformer, grow and qkv-layout keep the checkpoint (for the bug report), mark
its model card FAILED, print the reports with `FAILED: <what differed>` as the last line, and exit 1. Approximate
modes report and exit 0.

The fault is planted in the tensor math each command streams (one weight of layer 0 scaled), so the written
checkpoint really computes something else — the verification must see it on its own."""

import pytest
from click.testing import CliRunner

import netmorph.surgery.diff
import netmorph.surgery.grow
import netmorph.surgery.qkv_layout
from netmorph.cli import main
from tests.helpers import save_char_tokenizer, save_tiny_model


def corrupt(tensors: dict, layer_idx: int, name: str) -> dict:
    """Scale one weight of layer 0 by 1.5: a different function, same shapes."""
    if layer_idx == 0:
        key = next(k for k in tensors if k.endswith(name))
        tensors = {**tensors, key: tensors[key] * 1.5}
    return tensors


def plant_fault(monkeypatch, command: str) -> None:
    if command == "convert-diff-transformer":
        original = netmorph.surgery.diff.convert_layer

        def faulty(reader, config, spec, recipe, layer_idx, seed):
            return corrupt(original(reader, config, spec, recipe, layer_idx, seed), layer_idx, "v_proj.weight")

        monkeypatch.setattr(netmorph.surgery.diff, "convert_layer", faulty)
    elif command == "grow":
        original = netmorph.surgery.grow.grow_layer

        def faulty(layer, plan, is_new, options, generator, out_idx=None):
            return corrupt(original(layer, plan, is_new, options, generator, out_idx), out_idx, "v.weight")

        monkeypatch.setattr(netmorph.surgery.grow, "grow_layer", faulty)
    else:
        original = netmorph.surgery.qkv_layout.convert_layer

        def faulty(reader, plan, layer_idx):
            return corrupt(original(reader, plan, layer_idx), layer_idx, "qkv_proj.weight")

        monkeypatch.setattr(netmorph.surgery.qkv_layout, "convert_layer", faulty)
        # the bit-level checks would catch this first; the logit/generation proof is what is tested here
        monkeypatch.setattr(netmorph.surgery.qkv_layout, "check_round_trip", lambda *args: (0, None))
        monkeypatch.setattr(netmorph.surgery.qkv_layout, "check_row_placement", lambda *args: None)


COMMANDS = {
    "convert-diff-transformer": [],
    "grow": ["--intermediate-size", "64"],
    "qkv-layout": ["--to", "sequential"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_failed_proof_keeps_the_checkpoint_marks_it_and_exits_1(tmp_path, monkeypatch, command):
    source = save_char_tokenizer(save_tiny_model(tmp_path / "src", "llama", attention_bias=False, head_dim=4))
    plant_fault(monkeypatch, command)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [command, str(source), "-o", str(out), *COMMANDS[command]],
                                catch_exceptions=False)
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("FAILED: max |Δlogit|") and "exceeds" in last, result.output
    assert "→ FAIL" in result.output
    assert (out / "config.json").exists() and list(out.glob("*.safetensors")), "the checkpoint was not kept"
    assert "**Verification FAILED**" in (out / "README.md").read_text()


def test_an_approximate_mode_reports_its_divergence_and_exits_0(tmp_path):
    source = save_char_tokenizer(save_tiny_model(tmp_path / "src", "llama"))
    result = CliRunner().invoke(main, ["convert-diff-transformer", str(source), "-o", str(tmp_path / "out"),
                                       "--sublayer-norm"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "approximate mode, measured divergence" in result.output
    assert "FAILED" not in (tmp_path / "out" / "README.md").read_text()


def test_generations_that_differ_fail_an_exact_mode_even_within_the_logit_tolerance(tmp_path, monkeypatch):
    """The pass rule is logits within the tolerance AND equal generations: a fault that moves the logits by less than a
    huge tolerance still fails when it changes a greedy token."""
    source = save_char_tokenizer(save_tiny_model(tmp_path / "src", "llama"))
    plant_fault(monkeypatch, "convert-diff-transformer")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert-diff-transformer", str(source), "-o", str(out), "--tolerance", "1e6"],
                                catch_exceptions=False)
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("FAILED: greedy generation differs for"), result.output
    assert "**Verification FAILED**" in (out / "README.md").read_text()


def test_a_permutation_wrong_the_same_way_both_ways_is_caught_by_the_row_placement_check(tmp_path, monkeypatch):
    """A grouped fuse that stores the KV groups in reverse order, and a split that reads them back the same way: the
    round trip gives the source's bits back, no stock class reads the grouped layout of a Llama (so no logits can
    be compared), and only the independent account of where each row belongs sees it."""
    import netmorph.ops.qkv_layout as ops

    fuse, split = ops.fuse_grouped, ops.split_grouped

    def reversed_groups(tensor, heads):  # (G, rows per group, ...) with the groups in reverse order
        return tensor.reshape(heads.num_kv_heads, -1, *tensor.shape[1:]).flip(0).reshape(tensor.shape)

    monkeypatch.setattr(ops, "fuse_grouped", lambda q, k, v, heads: reversed_groups(fuse(q, k, v, heads), heads))
    monkeypatch.setattr(ops, "split_grouped", lambda fused, heads: split(reversed_groups(fused, heads), heads))
    source = save_char_tokenizer(save_tiny_model(tmp_path / "src", "llama"))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["qkv-layout", str(source), "-o", str(out), "--to", "grouped",
                                       "--allow-non-stock"], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1].startswith("FAILED: layer 0 weight row 0 does not hold q head 0")
    assert "**Verification FAILED**" in (out / "README.md").read_text()
