"""Benchmark: `netmorph qkv-layout` on a synthesized multi-shard Llama checkpoint (streaming, peak RSS, speed vs cp).

Synthesizes the same Llama checkpoint as streaming_conversion.py (hidden 4096, GQA 32:8, MLP 11008, bf16; default
4 layers ≈ 2.6 GB in 1 GB shards), then times `cp -r` + sync and two conversions + sync:
`--to sequential` (a stock Phi-3 checkpoint: every layer's q/k/v and gate/up are rearranged, 60 % of the bytes)
and `--to grouped --allow-non-stock` (only q/k/v rearranged). Peak RSS is GNU time's %M. Prints a Markdown table.

    .venv/bin/python benchmarks/qkv_layout_streaming.py [--layers 4] [--shard-size 1GB] [--workdir DIR]
"""

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming_conversion import GiB, synthesize, timed  # noqa: E402

from netmorph.options import size_in_bytes  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--shard-size", default="1GB")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix=".bench-qkv-", dir=args.workdir))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    command = [sys.executable, "-m", "netmorph.cli", "qkv-layout", str(root / "source"), "--no-verify", "--no-progress",
               "--max-shard-size", args.shard_size]
    try:
        synthesize(root / "source", args.layers, size_in_bytes(args.shard_size))
        shards = sorted((root / "source").glob("*.safetensors"))
        total, largest = sum(p.stat().st_size for p in shards), max(p.stat().st_size for p in shards)
        # the fixed cost of importing torch/transformers; the best of two (the first may read a cold disk cache)
        startup = min(timed([sys.executable, "-c", "import netmorph.cli, netmorph.surgery.qkv_layout"], env)[0]
                      for _ in range(2))
        copy_seconds, _, _ = timed(["cp", "-r", str(root / "source"), str(root / "copy")])
        shutil.rmtree(root / "copy")
        rows = [("input", f"{total / 1e9:.2f} GB bf16 in {len(shards)} shards, largest {largest / 1e9:.2f} GB"),
                ("`cp -r` + sync", f"{copy_seconds:.1f} s"),
                ("startup of the command (imports), included below", f"{startup:.1f} s")]
        for target, extra in (("sequential", []), ("grouped", ["--allow-non-stock"])):
            seconds, rss, _ = timed(command + ["--to", target, "-o", str(root / target), *extra], env)
            rows.append((f"qkv-layout --to {target} + sync",
                         f"{seconds:.1f} s (cp / qkv-layout = {copy_seconds / seconds:.2f}; without the startup "
                         f"{copy_seconds / (seconds - startup):.2f}), peak RSS {rss / GiB:.2f} "
                         f"GiB (bound: largest shard + 1 GiB = {(largest + GiB) / GiB:.2f} GiB)"))
            shutil.rmtree(root / target)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
