"""Fine-tune the original and the differential-attention SmolLM2-135M for the same steps on the same real text (CPU).

    make example        # or: .venv/bin/python examples/finetune_smollm2.py [--steps 40] [--work DIR]

1. converts the bundled SmolLM2-135M-Instruct GGUF to differential attention twice (both exact at conversion): with
   the paper's λ_init, and with --lambda-start zero;
2. trains the original and both conversions with `netmorph train` on the GPL-3 text for --steps steps (same data order, same optimizer);
   the converted model warms its λ mix from 0 to 1 over the first half;
3. evaluates both, before and after, on a held-out text (Apache-2.0) with `netmorph evaluate`;
4. writes examples/finetune_smollm2.png (loss, λ/mix, attention entropy) and prints a Markdown table for the README.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
NETMORPH = [sys.executable, "-m", "netmorph.cli"]
TRAIN_TEXT = "/usr/share/common-licenses/GPL-3"
EVAL_TEXT = "/usr/share/common-licenses/Apache-2.0"


# name → convert-diff-transformer flags (None: the original model, not converted)
VARIANTS = {
    "original": None,
    "differential": [],  # the paper's λ_init (0.2 … 0.8), negative q/k ~ N(0, 0.02), mix warmed up 0 → 1
    "differential-lambda0": ["--lambda-start", "zero"],  # λ = 0 exactly at any mix, learned from there
}


def run(*args) -> str:
    """One netmorph command in a subprocess; its stderr (progress, logs) passes through."""
    print("$ netmorph", " ".join(str(a) for a in args), flush=True)
    return subprocess.run([*NETMORPH, *map(str, args)], check=True, stdout=subprocess.PIPE, text=True).stdout


def eval_loss(model: Path | str, sequence_len: int) -> float:
    report = json.loads(run("evaluate", model, "--dataset", EVAL_TEXT, "--sequence-len", sequence_len, "--json"))
    return report["results"][0]["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sequence-len", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--work", type=Path, default=Path("demo-output/finetune-example"))
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="Train only these variants (the figure shows every run found in --work).")
    args = parser.parse_args()

    from netmorph.sources import bundled_model_file

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    settings = {"datasets": [{"path": TRAIN_TEXT, "type": "completion"}], "test_datasets": [{"path": EVAL_TEXT}],
                "sequence_len": args.sequence_len, "micro_batch_size": 1, "max_steps": args.steps,
                "learning_rate": args.learning_rate, "lr_scheduler": "cosine", "warmup_steps": 2,
                "logging_steps": 2, "eval_steps": max(1, args.steps // 2), "seed": 0}
    rows = {}
    for name in args.only:
        flags = VARIANTS[name]
        config = {**settings, "base_model": str(bundled_model_file()), "output_dir": str(work / name)}
        if flags is not None:
            converted = work / f"{name}-converted"
            run("convert-diff-transformer", "--output-dir", converted, "--force", "--no-verify", *flags)
            config = {**yaml.safe_load((converted / "config.yml").read_text()), **config, "base_model": str(converted),
                      "diff_attn_warmup_steps": args.steps // 2, "diff_attn_log_every": 2,
                      "diff_attn_num_monitor_layers": 3}
        path = work / f"{name}.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        before = eval_loss(config["base_model"], args.sequence_len)
        start = time.perf_counter()
        run("train", path, "--no-progress")
        seconds = time.perf_counter() - start
        rows[name] = (before, eval_loss(config["output_dir"], args.sequence_len), seconds)

    figure = HERE / "finetune_smollm2.png"
    runs = [work / name for name in VARIANTS if (work / name / "trainer_state.json").exists()]
    run("plot", "training", *runs, "-o", figure)
    print(f"\n{args.steps} steps × {args.sequence_len} tokens on GPL-3, eval on Apache-2.0 (fp32, CPU):\n")
    print("| model | eval loss before | eval loss after | train time |")
    print("|---|---|---|---|")
    for name, (before, after, seconds) in rows.items():
        print(f"| {name} | {before:.4f} | {after:.4f} | {seconds:.0f} s |")
    print(f"\nfigure: {figure}")


if __name__ == "__main__":
    main()
