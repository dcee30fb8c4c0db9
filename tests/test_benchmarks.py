"""The GPU benchmark script runs its whole code path on CPU at tiny shapes (so it does not rot between GPU loans),
and without CUDA a plain run skips cleanly."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_diff_attention.py"


def run(*args) -> str:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1]), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_gpu_benchmark_smoke_run_on_cpu_prints_every_ratio():
    table_text = run("--device", "cpu", "--small", "--no-write")
    table = [line for line in table_text.splitlines() if line.startswith("| ")]
    rows = {line.split("|")[1].strip(): line for line in table}
    assert {"training step", "greedy decode", "attention layer fwd+bwd"} <= set(rows)
    for name in ("training step", "greedy decode", "attention layer fwd+bwd"):
        cells = [c.strip() for c in rows[name].split("|")[2:-1]]
        assert len(cells) == 10 and all(float(c) > 0 for c in cells)
    calls = [name for name in rows if "SDPA call" in name or "heads, " in name]
    assert len(calls) >= 5 and all(len(rows[name].split("|")) == 6 for name in calls)
    # the fused kernel runs (in Triton's interpreter, TRITON_INTERPRET=1 from conftest) or says why it did not
    assert "split heads, fused Triton kernel" in rows or "fused split-heads kernel skipped" in table_text


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the plain run would benchmark, not skip")
def test_gpu_benchmark_skips_without_cuda():
    assert "GPU benchmark skipped" in run("--no-write")
