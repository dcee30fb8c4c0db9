"""Checkpoints written under one transformers release generate identically under another.

The compatibility job (tests/compat.py) writes tests/compat_checkpoints.CASES under the declared floor and the newest
release, and runs this module under each with NETMORPH_COMPAT_FOREIGN pointing at the other's. Here every foreign
checkpoint must generate — dynamic cache, static cache, no cache, left-padded batch — exactly what the original model
generates under the installed transformers, and exactly what the same case written under the installed transformers
generates; converted checkpoints must also load as remote code with netmorph blocked. Outside the job (no foreign
checkpoints) the module skips.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.compat_checkpoints import CASES, write
from tests.test_generate import BACKEND, assert_generates_like, generate, load, padded_batch

FOREIGN = os.environ.get("NETMORPH_COMPAT_FOREIGN")
pytestmark = [pytest.mark.compat,
              pytest.mark.skipif(not FOREIGN, reason="run by the compatibility job (python -m tests.compat)")]


def backend(case: str) -> str:
    return BACKEND.get(case.split("-")[0], "sdpa")


@pytest.mark.parametrize("case", CASES)
def test_foreign_checkpoint_generates_like_the_original_and_like_a_local_one(tmp_path, case):
    foreign_source, foreign_output = Path(FOREIGN) / case / "source", Path(FOREIGN) / case / "output"
    assert foreign_output.is_dir(), f"the compat job wrote no {case} under {FOREIGN}"
    assert_generates_like(foreign_source, foreign_output, backend(case))
    _, local_output = write(tmp_path, case)
    ids, mask = padded_batch()
    assert torch.equal(generate(load(foreign_output, backend(case)), ids, mask),
                       generate(load(local_output, backend(case)), ids, mask))


def test_foreign_conversions_load_as_remote_code_without_netmorph(tmp_path):
    """A process where `import netmorph` fails: each foreign differential checkpoint loads with trust_remote_code and
    its logits equal the original's (its modeling files are the ones written next to the weights)."""
    pairs = {case: (str(Path(FOREIGN) / case / "source"), str(Path(FOREIGN) / case / "output"), backend(case))
             for case in CASES if not case.endswith(("diffllama", "grown", "grown-depth"))}
    script = textwrap.dedent(f"""
        import sys
        sys.modules["netmorph"] = None
        sys.modules["triton"] = None
        import torch
        from transformers import AutoModelForCausalLM
        ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(0))
        for case, (source, converted, backend) in {pairs!r}.items():
            model = AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True, dtype=torch.float32,
                                                         attn_implementation=backend)
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation=backend)
            with torch.no_grad():
                print("MAXDIFF", case, (original(ids).logits - model(ids).logits).abs().max().item())
    """)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf-home"),
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    diffs = {line.split()[1]: float(line.split()[2]) for line in result.stdout.splitlines() if line.startswith("MAXDIFF")}
    assert set(diffs) == set(pairs)
    # fp32; the split layout regroups o_proj's sums (≤ 1.2e-5 measured, tests/test_property_modes.py), the others
    # compute the source's operations.
    assert max(diffs.values()) <= 1e-4, diffs
