"""`qkv-layout` on the real bundled SmolLM2-135M (fp32; 30 layers, 9 query / 3 KV heads, head_dim 64 = 576 / 9,
no biases, tied embeddings): `--to sequential` writes a stock Phi-3 checkpoint that computes the same function, and
`--to separate` brings back the Llama checkpoint bit for bit.

Tolerance (fp32): a fused q/k/v matmul may round differently from three separate ones, so the command's own
verification (both stock classes on real text, fp32, sdpa) is held to its default 1e-5 with identical greedy text;
measured: 0.0 (`-s` prints the figure).
"""

import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from netmorph.cli import main

pytestmark = pytest.mark.real_model


def run(*args) -> str:
    result = CliRunner().invoke(main, ["qkv-layout", *map(str, args)], prog_name="netmorph", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_smollm2_to_a_stock_phi3_and_back(smollm2_dir, tmp_path):
    output = run(smollm2_dir, "--to", "sequential", "-o", tmp_path / "phi3")
    assert "stock phi3" in output and "PASS" in output and "Generations match" in output
    fp32_diff = float(re.search(r"max \|Δlogit\| = ([0-9.e+-]+)", output).group(1))
    print(f"SmolLM2 → Phi-3, fp32 real text (command's verification): max |Δlogit| = {fp32_diff:.3e}")
    assert fp32_diff <= 1e-5

    run(tmp_path / "phi3", "--to", "separate", "-o", tmp_path / "llama", "--no-verify")
    before, after = load_file(smollm2_dir / "model.safetensors"), load_file(tmp_path / "llama" / "model.safetensors")
    assert sorted(before) == sorted(after) and all(torch.equal(before[n], after[n]) for n in before)
