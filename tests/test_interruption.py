"""SIGKILL a conversion at observed stages: the output path is then absent or complete, and a re-run succeeds.

Each conversion runs as a real `netmorph convert-diff-transformer` process (with verification, small shards, so
every stage lasts long enough to be seen). The test polls the file system and kills the process the moment its
stage appears: nothing in netmorph knows it is being tested. After the kill, the stage the process had actually
reached is read back from disk, the output checked, and the same command re-run; the re-run must succeed, remove
the killed run's temp dir, and write the same bytes as an uninterrupted run.
"""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

import netmorph
from netmorph.cli import main
from netmorph.io.writer import atomic_output_dir
from tests.helpers import load, max_logit_diff, random_ids, save_tiny_model

REPO_ROOT = Path(netmorph.__file__).parents[1]
# ~12 MB of fp32 weights, written as 512 KB shards: the shard stage lasts long enough to be seen, and a character
# tokenizer lets verification (the stage between writing and renaming) run.
MODEL = dict(vocab_size=128, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=32, tie_word_embeddings=False)
SHARD = "512KB"

# Stage names, in the order a conversion passes them; `stage_on_disk` tells which one a killed run had reached. The
# streaming writer creates every shard under its final name at once (space reserved) and fills it in place, so
# "mid-writing" is a kill 10 ms into that stage: on disk it reads as "shards allocated".
STAGES = ("starting", "temp dir created", "shards allocated", "mid-writing", "index written", "verifying",
          "output in place")
DISK_STAGES = tuple(stage for stage in STAGES if stage != "mid-writing")


def save_char_tokenizer(directory: Path) -> None:
    """One token per character (printable ASCII + newline): enough for verification's texts and greedy prompts."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>"])}
    for character in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[character] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<unk>").save_pretrained(directory)


def partial_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def stage_on_disk(out: Path) -> str:
    if out.exists():
        return "output in place"
    temps = partial_dirs(out)
    if not temps:
        return "starting"
    names = {p.name for p in temps[0].iterdir()}
    if "config.yml" in names:
        return "verifying"
    if "model.safetensors.index.json" in names:
        return "index written"
    if any(name.startswith("model") for name in names):
        return "shards allocated"
    return "temp dir created"


def sha256_of_weights(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))}


def convert_args(source: Path, out: Path) -> list[str]:
    return ["convert-diff-transformer", str(source), "-o", str(out), "--max-shard-size", SHARD, "--seed", "3"]


def assert_complete(out: Path, reference_hashes: dict[str, str]) -> None:
    """Every file of a finished conversion, verification passed, and the weights byte-identical to the reference
    run (whose logits were compared with the source's)."""
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "README.md", "config.yml", "model.safetensors.index.json", "tokenizer.json",
            "modeling_netmorph_diff.py"} <= names, names
    assert "→ PASS" in (out / "README.md").read_text()
    assert sha256_of_weights(out) == reference_hashes


def test_sigkill_at_every_stage_leaves_absent_or_complete_output_and_rerun_succeeds(tmp_path):
    source = save_tiny_model(tmp_path / "src", "llama", **MODEL)
    save_char_tokenizer(source)
    reference = tmp_path / "reference"
    result = CliRunner().invoke(main, convert_args(source, reference), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    reference_hashes = sha256_of_weights(reference)
    expected_shards = len(reference_hashes)
    assert expected_shards >= 8
    assert_complete(reference, reference_hashes)
    assert max_logit_diff(load(source), load(reference), random_ids(vocab_size=MODEL["vocab_size"])) <= 1e-5

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    runs = {}
    for stage in STAGES:  # one process per target stage, all started together and watched by one polling loop
        out = tmp_path / stage.replace(" ", "-") / "out"
        out.parent.mkdir()
        process = subprocess.Popen([sys.executable, "-m", "netmorph.cli", *convert_args(source, out)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runs[stage] = (process, out)
    started, pending, writing_since = time.monotonic(), set(STAGES), None
    while pending and time.monotonic() - started < 240:
        for stage in list(pending):
            process, out = runs[stage]
            seen = stage_on_disk(out)
            if stage == "mid-writing":
                if seen == "shards allocated" and writing_since is None:
                    writing_since = time.monotonic()
                at_or_past = DISK_STAGES.index(seen) > DISK_STAGES.index("shards allocated") or (
                    writing_since is not None and time.monotonic() - writing_since > 0.01)
            else:
                at_or_past = DISK_STAGES.index(seen) >= DISK_STAGES.index(stage)
            importing = stage == "starting" and time.monotonic() - started > 1.0  # python is loading torch by now
            if importing or (stage != "starting" and at_or_past) or process.poll() is not None:
                process.send_signal(signal.SIGKILL)
                process.wait()
                pending.discard(stage)
        time.sleep(0.0005)
    assert not pending, f"runs never reached {pending}"

    reached = {}
    for stage, (process, out) in runs.items():
        assert process.returncode == -signal.SIGKILL, (stage, process.returncode)
        reached[stage] = stage_on_disk(out)
        if out.exists():
            assert_complete(out, reference_hashes)
            assert not partial_dirs(out)
            rerun = convert_args(source, out) + ["--force"]
        else:
            assert not out.exists()
            rerun = convert_args(source, out)
        result = CliRunner().invoke(main, rerun, catch_exceptions=False)
        assert result.exit_code == 0, (stage, result.output)
        assert not partial_dirs(out), (stage, partial_dirs(out))  # the killed run's temp dir is gone
        assert_complete(out, reference_hashes)
    # The kills landed at distinct points of the conversion (read back from disk, not assumed).
    print("stage reached by each killed run:", reached)
    # Of the 6 states a conversion shows on disk, "temp dir created" and "index written" last milliseconds and a
    # busy machine can step over them; the others are always hit.
    assert len(set(reached.values())) >= 4, reached
    assert {"starting", "output in place"} <= set(reached.values()), reached
    assert {"first shards written", "half the shards written", "weights renamed", "verifying"} & set(reached.values())


def test_stale_temp_dirs_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    """A re-run removes `.out.partial-HOST-PID-*` of a dead PID only; a live writer's temp dir is left alone."""
    import socket

    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".out.partial-{host}-{dead.pid}-abc"
    live = tmp_path / f".out.partial-{host}-{os.getpid()}-def"
    other_host = tmp_path / f".out.partial-{host}x-{dead.pid}-ghi"
    for directory in (stale, live, other_host):
        directory.mkdir()
        (directory / "shard-00000.partial").write_bytes(b"x")
    with atomic_output_dir(out) as tmp:
        (tmp / "file").write_text("done")
    assert (out / "file").read_text() == "done"
    assert not stale.exists() and live.exists() and other_host.exists()


def test_sigkill_while_growing_leaves_no_output_and_rerun_succeeds(tmp_path):
    """`grow` writes through the same streaming writer inside the same atomic temp dir: killed while its shards are
    being filled, it leaves nothing at the output path, and a re-run removes the dead run's temp dir and writes the
    same bytes as an uninterrupted run."""
    source = save_tiny_model(tmp_path / "src", "llama", **MODEL)
    reference, out = tmp_path / "reference", tmp_path / "killed" / "out"
    args = ["grow", str(source), "--num-layers", "6", "--intermediate-size", "1024", "--max-shard-size", SHARD,
            "--no-verify", "--seed", "3"]
    result = CliRunner().invoke(main, [*args, "-o", str(reference)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    reference_hashes = sha256_of_weights(reference)
    assert len(reference_hashes) >= 8

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out.parent.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "netmorph.cli", *args, "-o", str(out)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    while stage_on_disk(out) != "shards allocated" and process.poll() is None and time.monotonic() - started < 120:
        time.sleep(0.0005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before its shards were seen"
    assert not out.exists() and partial_dirs(out)  # killed mid-write: only the temp dir, with its shard files

    result = CliRunner().invoke(main, [*args, "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not partial_dirs(out)
    assert sha256_of_weights(out) == reference_hashes
