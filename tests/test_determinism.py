"""Same command + same seed → byte-identical weight files, in every conversion mode; another seed → other random
weights (and only those). The two runs differ in everything that must not matter: the global torch RNG state and
the number of torch threads. (test_interruption.py adds a third: a separate process.)"""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import convert, save_tiny_model

MODES = {
    "default": {},
    "zero-init": {"negative_init": "zero"},
    "mirror": {"negative_init": "mirror"},
    "split-heads": {"split_heads": True},
    "sublayer-norm": {"sublayer_norm": True},
    "lambda-start-zero": {"lambda_start": "zero"},
}
EVEN_HEADS = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=4, hidden_size=32)
SHARD = "8KB"  # several shards, so the split points and the index are part of what must repeat


def sha256_of_weights(directory: Path) -> dict[str, str]:
    files = sorted(directory.glob("*.safetensors"))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("determinism") / "src", "llama", **EVEN_HEADS)


@pytest.mark.parametrize("mode", MODES, ids=list(MODES))
def test_same_seed_same_bytes_other_seed_other_random_weights(mode, source, tmp_path):
    options = dict(MODES[mode], seed=5, max_shard_size=SHARD)
    torch.manual_seed(123)
    torch.set_num_threads(1)
    convert(source, tmp_path / "a", **options)
    torch.manual_seed(456)
    torch.randn(1000)  # a different global RNG state: the conversion must use its own generators only
    torch.set_num_threads(2)
    try:
        convert(source, tmp_path / "b", **options)
    finally:
        torch.set_num_threads(1)
    hashes = sha256_of_weights(tmp_path / "a")
    assert len(hashes) >= 3, hashes
    assert sha256_of_weights(tmp_path / "b") == hashes
    index = "model.safetensors.index.json"
    assert json.loads((tmp_path / "a" / index).read_text()) == json.loads((tmp_path / "b" / index).read_text())

    convert(source, tmp_path / "c", **dict(options, seed=6))
    first, other = weights(tmp_path / "a"), weights(tmp_path / "c")
    assert first.keys() == other.keys()
    changed = {name for name in first if not torch.equal(first[name], other[name])}
    layers = range(2)
    lambdas = {f"model.layers.{i}.self_attn.lambda_{v}" for i in layers for v in ("q1", "k1", "q2", "k2")}
    random_negative = mode in ("default", "sublayer-norm", "lambda-start-zero")
    negative_q_k = {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in layers for p in "qk"}
    assert changed == lambdas | (negative_q_k if random_negative else set()), sorted(changed)
    if random_negative:  # only the new (negative) rows move with the seed; the pretrained rows are the source's
        rows = EVEN_HEADS["num_attention_heads"] * EVEN_HEADS["head_dim"]
        q = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(first[q][:rows], other[q][:rows])
        assert not torch.equal(first[q][rows:], other[q][rows:])


@pytest.mark.parametrize("family", ["phi3", "llama"])
def test_grow_gives_the_same_bytes_in_processes_with_other_string_hashing(tmp_path, family):
    """Two processes with different PYTHONHASHSEED (so any set or dict of strings iterates in another order): the
    same shards. A set of global tensor names once decided the order they were written in."""
    import os
    import subprocess
    import sys

    from tests.grow_helpers import save_tiny

    source = save_tiny(tmp_path / "src", family)
    hashes = []
    for seed in ("1", "2"):
        out = tmp_path / f"out-{seed}"
        subprocess.run([sys.executable, "-m", "netmorph.cli", "grow", str(source), "-o", str(out), "--num-layers", "3",
                        "--max-shard-size", "8KB", "--no-verify", "--no-progress"], check=True, capture_output=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}, timeout=300)
        hashes.append(sha256_of_weights(out))
    assert len(hashes[0]) >= 3 and hashes[0] == hashes[1]
