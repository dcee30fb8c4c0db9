"""Benchmark: streaming conversion of a multi-shard Llama checkpoint larger than the conversion's memory.

Synthesizes a Llama checkpoint (random bf16 weights, written shard by shard with netmorph's StreamingWriter;
default 16 layers of hidden 4096 / GQA 32:8 / MLP 11008 with SmolLM2's tokenizer and vocabulary: 6.5 GB in 2 GB
shards), then in one run:

1. `cp -r` of the checkpoint and `netmorph convert-diff-transformer --no-verify`, alternately, ROUNDS times each,
   every run followed by `sync` of the files it wrote (not a global sync: other jobs' dirty pages are not this
   run's), with the source in the same page-cache state before each: "warm" (read just before, as after a
   download) and "cold" (evicted with posix_fadvise(DONTNEED), which needs no root); throughput ratio and peak RSS;
   plus the fixed start-up of the command (imports and reading the config: the same whatever the size);
2. (see 1);
3. `netmorph convert-diff-transformer` with verification on (auto mode: layer-wise here, since two fp32 models
   would not fit): peak RSS of conversion + verification, and the verification figures.

Peak RSS is the maximum resident set size of the command (GNU time %M). Appends the table to
BENCHMARKS.md with date, machine and versions, and deletes the synthesized files unless --keep.

    .venv/bin/python benchmarks/streaming_conversion.py [--layers 16] [--shard-size 2GB] [--workdir DIR]
"""

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from benchmarks_md import write_section  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from netmorph.io.reader import TensorInfo  # noqa: E402
from netmorph.io.streaming import StreamingWriter  # noqa: E402
from netmorph.options import size_in_bytes  # noqa: E402
from netmorph.sources import resolve_source  # noqa: E402

GiB = 2**30


def synthesize(directory: Path, layers: int, shard_bytes: int) -> LlamaConfig:
    """A Llama checkpoint with N(0, 0.02) bf16 weights and unit norms, never more than one tensor in memory."""
    directory.mkdir(parents=True)
    source = resolve_source(None)  # SmolLM2's tokenizer: real text tokenizes as in a real model
    source.save_tokenizer(directory)
    tokenizer = source.load_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, dtype="bfloat16",
    )
    config.save_pretrained(directory)
    with torch.device("meta"):
        names = LlamaForCausalLM(config).to(torch.bfloat16).state_dict()
    plan = [TensorInfo(name, tuple(t.shape), t.dtype) for name, t in names.items()]
    generator = torch.Generator().manual_seed(0)
    with StreamingWriter(directory, plan, shard_bytes) as writer:
        for spec in plan:
            if "norm" in spec.name:
                writer.add(spec.name, torch.ones(spec.shape, dtype=spec.dtype))
            else:
                writer.add(spec.name, (torch.randn(spec.shape, generator=generator) * 0.02).to(spec.dtype))
        writer.finish()
    return config


def timed(command: list[str], output: Path, env: dict | None = None) -> tuple[float, int, str]:
    """(wall seconds including `sync` of the files written under `output`, peak RSS of the command in bytes, its
    stdout). The RSS comes from GNU time, which starts the command from its own small process: a child forked
    straight from this (large) process would count the parent's pages in its maximum RSS before exec."""
    with tempfile.NamedTemporaryFile("r") as rss_file:
        start = time.perf_counter()
        run = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss_file.name, *command], stdout=subprocess.PIPE,
                             env=env, text=True, check=False)
        written = [str(p) for p in output.rglob("*") if p.is_file()] if output.is_dir() else []
        subprocess.run(["sync", *written], check=True)
        seconds = time.perf_counter() - start
        if run.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed with status {run.returncode}")
        peak_kib = int(rss_file.read().split()[-1])
    return seconds, peak_kib * 1024, run.stdout


def set_cache_state(files: list[Path], state: str) -> None:
    """warm: every byte of the source in the page cache; cold: none of it (clean pages dropped, this file only)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            if state == "cold":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 64 * 2**20):
                    pass
        finally:
            os.close(fd)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--shard-size", default="2GB", help="Shard size of the synthesized input checkpoint.")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                        help="Where the temporary checkpoints go (needs ~4x the checkpoint size free).")
    parser.add_argument("--rounds", type=int, default=2, help="cp/convert pairs per cache state.")
    parser.add_argument("--keep", action="store_true", help="Keep the synthesized and converted checkpoints.")
    parser.add_argument("--no-write", action="store_true", help="Print only; do not append to BENCHMARKS.md.")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix=".bench-streaming-", dir=args.workdir))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    netmorph = [sys.executable, "-m", "netmorph.cli", "convert-diff-transformer", str(root / "source")]
    try:
        start = time.perf_counter()
        synthesize(root / "source", args.layers, size_in_bytes(args.shard_size))
        shards = sorted((root / "source").glob("*.safetensors"))
        total = sum(p.stat().st_size for p in shards)
        largest = max(p.stat().st_size for p in shards)
        print(f"synthesized {total / 1e9:.2f} GB in {len(shards)} shards in {time.perf_counter() - start:.0f} s")

        subprocess.run(["sync"], check=True)  # the synthesized shards on disk before anything is timed
        source_files = sorted(p for p in (root / "source").iterdir() if p.is_file())
        startup, _, _ = timed([sys.executable, "-c", "import netmorph.cli, netmorph.surgery.diff\n"
                               "from netmorph.sources import resolve_source\n"
                               f"resolve_source({str(root / 'source')!r}).reader()"], root, env)
        runs = {"warm": {"cp": [], "convert": []}, "cold": {"cp": [], "convert": []}}
        loads = [os.getloadavg()[0]]
        convert_rss = 0
        for state in ("warm", "cold"):
            for _ in range(args.rounds):
                set_cache_state(source_files, state)
                seconds, _, _ = timed(["cp", "-r", str(root / "source"), str(root / "copy")], root / "copy")
                runs[state]["cp"].append(seconds)
                shutil.rmtree(root / "copy")
                set_cache_state(source_files, state)
                seconds, rss, _ = timed(netmorph + ["-o", str(root / "converted"), "--no-verify", "--no-progress"],
                                        root / "converted", env)
                runs[state]["convert"].append(seconds)
                convert_rss = max(convert_rss, rss)
                written = sum(p.stat().st_size for p in (root / "converted").glob("*.safetensors"))
                shutil.rmtree(root / "converted")
                loads.append(os.getloadavg()[0])
                print(f"{state}: cp {runs[state]['cp'][-1]:.1f} s, convert {seconds:.1f} s, peak RSS {rss / GiB:.2f} GiB, "
                      f"load {loads[-1]:.1f}", flush=True)

        set_cache_state(source_files, "warm")
        verify_seconds, verify_rss, verify_output = timed(
            netmorph + ["-o", str(root / "verified"), "--no-progress"], root / "verified", env
        )
        card = (root / "verified" / "README.md").read_text()
        layerwise = "layer-wise" in card
        summary = [line for line in verify_output.splitlines() if "max |Δlogit|" in line and "→" in line]
        print(verify_output)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    bound = largest + GiB

    def ratio(state: str) -> float:  # cp time / convert time, each summed over the rounds
        return sum(runs[state]["cp"]) / sum(runs[state]["convert"])

    def times(state: str, what: str) -> str:
        return " / ".join(f"{t:.1f}" for t in runs[state][what]) + " s"

    warm_convert = sum(runs["warm"]["convert"]) / args.rounds
    rows = [
        ("input checkpoint", f"{total / 1e9:.2f} GB bf16 in {len(shards)} shards, largest {largest / 1e9:.2f} GB"),
        ("load average (1 min) before / during the timed runs",
         f"{loads[0]:.1f} / {min(loads[1:]):.1f}–{max(loads[1:]):.1f} (load of other jobs on the same cores adds to it)"),
        ("source warm (in the page cache): `cp -r` + sync, each round", times("warm", "cp")),
        ("source warm: convert --no-verify + sync, each round",
         times("warm", "convert") + f" ({total / 1e9:.2f} GB read, {written / 1e9:.2f} GB written)"),
        ("**throughput ratio, warm** (cp time / convert time; goal ≥ 0.5)", f"**{ratio('warm'):.2f}**"),
        ("source cold (evicted): `cp -r` + sync, each round", times("cold", "cp")),
        ("source cold: convert --no-verify + sync, each round", times("cold", "convert")),
        ("**throughput ratio, cold**", f"**{ratio('cold'):.2f}**"),
        ("fixed start-up (imports, reading config and headers)", f"{startup:.1f} s"),
        ("warm ratio without the start-up: cp / (convert − start-up)",
         f"{sum(runs['warm']['cp']) / args.rounds / (warm_convert - startup):.2f}"),
        ("**peak RSS** convert --no-verify, all runs (bound: largest shard + 1 GiB)",
         f"**{convert_rss / GiB:.2f} GiB** (bound {bound / GiB:.2f} GiB: {'holds' if convert_rss <= bound else 'EXCEEDED'})"),
        (f"convert with verification ({'layer-wise, chosen automatically' if layerwise else 'full'}) + sync",
         f"{verify_seconds:.0f} s; " + (summary[0].strip().replace("|", "\\|") if summary else "no summary line")),
        ("**peak RSS** convert + verification (same bound)",
         f"**{verify_rss / GiB:.2f} GiB** ({'holds' if verify_rss <= bound else 'EXCEEDED'})"),
    ]
    table = "| measurement | result |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)
    print(table)
    if args.no_write:
        return
    command = "python benchmarks/streaming_conversion.py " + " ".join(sys.argv[1:])
    section = (
        f"\n## Streaming conversion of a {total / 1e9:.1f} GB Llama checkpoint ({datetime.date.today().isoformat()})\n\n"
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (the load average in the table "
        f"says how busy they were), {psutil_total_gib():.0f} GiB RAM, {filesystem_of(args.workdir)}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}. Synthesized Llama "
        f"(hidden 4096, 32/8 heads, MLP 11008, {args.layers} layers, vocab of SmolLM2, random N(0, 0.02) bf16 "
        "weights, untied lm_head); default conversion (doubled heads, 5GB output shards). `cp -r` and the conversion "
        f"alternate, {args.rounds} rounds each per page-cache state of the source: warm (read just before) and cold "
        "(evicted with posix_fadvise(DONTNEED): /proc/sys/vm/drop_caches would drop every other job's cache too). "
        "Each time includes `sync` of the files that run wrote. Other jobs' load on the shared cores and disk adds "
        "noise to every time (load average in the table); an idle machine gives steadier figures.\n"
        f"Command: `{command.strip()}`\n\n{table}\n"
    )
    path = write_section(section, replace="## Streaming conversion of")  # the previous run's section goes
    print(f"wrote the streaming section of {path}")


def psutil_total_gib() -> float:
    import psutil

    return psutil.virtual_memory().total / GiB


def filesystem_of(path: Path) -> str:
    output = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, check=False).stdout.splitlines()
    return f"{output[-1].split()[1]} disk" if len(output) > 1 else "disk"


if __name__ == "__main__":
    main()
