"""Does differential attention help a pretrained model? SmolLM2-135M against four surgeries, trained alike.

    make experiment                       # the CPU size (58 min on 2 cores when it ran; README has the table)
    .venv/bin/python examples/value_experiment.py --size gpu      # on a GPU
    .venv/bin/python examples/value_experiment.py --size tiny     # a few steps: checks the pipeline end to end

Models (all from the bundled SmolLM2-135M-Instruct GGUF, all exact at step 0):
  original           the model itself
  v1-lambda0         convert-diff-transformer --lambda-start zero (λ = 0 at any mix, learned from there)
  v1-paper-warmup    the paper's λ_init (0.2 … 0.8) with the mix warmed 0 → 1 over 75 % of the steps
  v2                 DIFF V2 (--variant v2): paired query heads, per-token λ = sigmoid(lambda_proj(x))
  grown              netmorph grow --num-layers 34 --new-layers-at interleave (4 new zero-output layers)

Each is trained with `netmorph train` on the same tokens in the same order (seed 0, AdamW, cosine, same learning
rate) and evaluated before and after on held-out text with the code of `netmorph evaluate` and `netmorph probe` (activation
outliers, multi-needle retrieval and its attention masses, weight/activation quantization deltas).

Text: the Python language reference and library topics that CPython ships as `pydoc_data/topics.py` (the Debian
package libpython3.11-stdlib; every CPython install has it): ~465 kB of English technical prose, larger than any
license file. 90 % of the topics train, the last 10 % are held out; the Apache-2.0 license is a second, out-of-domain
held-out text. Writes OUT/results.json, OUT/results.md (the Markdown table), OUT/curves.png (training curves) and
OUT/probes.png (the probes of every trained model).
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

NETMORPH = [sys.executable, "-m", "netmorph.cli"]
APACHE = "/usr/share/common-licenses/Apache-2.0"
# The probes' haystack and quantization text, as `netmorph probe` uses by default.
DEFAULT_PROBE_TEXTS = ("/usr/share/common-licenses/Apache-2.0", "/usr/share/common-licenses/GPL-3")

# Sizes: steps × micro_batch × sequence_len tokens per model, and the probes' settings.
SIZES = {
    "tiny": dict(steps=3, batch=1, sequence_len=64, learning_rate=1e-4, eval_blocks=2,
                 probe=dict(lengths=(192,), depths=(0.5,), needles=2, sequence_len=64, max_blocks=1)),
    "cpu": dict(steps=120, batch=1, sequence_len=256, learning_rate=1e-4, eval_blocks=16,
                probe=dict(lengths=(256, 512), depths=(0.1, 0.5, 0.9), needles=3, sequence_len=256, max_blocks=2)),
    "gpu": dict(steps=2000, batch=8, sequence_len=1024, learning_rate=1e-4, eval_blocks=64,
                probe=dict(lengths=(512, 1024, 2048, 4096), depths=(0.1, 0.3, 0.5, 0.7, 0.9), needles=5,
                           sequence_len=1024, max_blocks=8)),
}

# name → (command, flags) building the starting checkpoint; None: the original GGUF itself.
MODELS = {
    "original": None,
    "v1-lambda0": ("convert-diff-transformer", ["--lambda-start", "zero"]),
    "v1-paper-warmup": ("convert-diff-transformer", []),
    "v2": ("convert-diff-transformer", ["--variant", "v2"]),
    "grown": ("grow", ["--num-layers", "34", "--new-layers-at", "interleave"]),
}


def run(*args) -> str:
    """One netmorph command in a subprocess (the surgeries: the commands a user runs); stderr passes through."""
    print("$ netmorph", " ".join(str(a) for a in args), flush=True)
    return subprocess.run([*NETMORPH, *map(str, args)], check=True, stdout=subprocess.PIPE, text=True).stdout


def write_texts(work: Path, held_out_chars: int) -> tuple[Path, Path]:
    """train.txt (90 % of pydoc_data's topics) and heldout.txt (the first `held_out_chars` characters of the rest:
    the trainer evaluates all of it at every eval step), one topic per paragraph."""
    import pydoc_data.topics

    topics = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    cut = int(len(topics) * 0.9)
    train, heldout = work / "train.txt", work / "heldout.txt"
    train.write_text("\n\n".join(topics[:cut]))
    heldout.write_text("\n\n".join(topics[cut:])[:held_out_chars])
    return train, heldout


def measure(model: Path, texts: dict[str, Path], size: dict, probe_dir: Path) -> dict:
    """Load `model` once (in this process): its loss on each text (what `netmorph evaluate` computes) and every probe
    (what `netmorph probe` computes), written to probe_dir/probe.json."""
    import torch

    from netmorph.probes import ProbeReport, ProbeSettings, probe_model
    from netmorph.train.data import pack, read_documents
    from netmorph.train.run import _evaluation_source, evaluate_loss

    print(f"measuring {model}", flush=True)
    source = _evaluation_source(str(model), False)
    network, tokenizer = source.load_model("sdpa"), source.load_tokenizer()
    losses = {}
    for name, path in texts.items():
        blocks = pack(tokenizer, read_documents(path), size["sequence_len"])[: size["eval_blocks"]]
        losses[name] = evaluate_loss(network, blocks)[0]
    settings = ProbeSettings(texts={p.name: p.read_text() for p in map(Path, DEFAULT_PROBE_TEXTS)}, **size["probe"])
    report = ProbeReport({}, [probe_model(network, tokenizer, settings, str(model))])
    probe_dir.mkdir(parents=True, exist_ok=True)
    (probe_dir / "probe.json").write_text(report.to_json())
    del network
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"losses": losses, "probes": summary(json.loads(report.to_json()))}


def summary(report: dict) -> dict:
    """The figures of one probe.json that go into the table."""
    m = report["models"][0]
    outliers, retrieval, quantization = m["outliers"], m["retrieval"], m["quantization"]
    ratio = lambda o, site: float(o[site]["max_over_median"])  # noqa: E731
    rows = {row["name"]: row["loss_delta"] for row in quantization["rows"]}
    return {
        "residual_ratio_max": max(ratio(o, "residual") for o in outliers),
        "residual_kurtosis_mean": sum(float(o["residual"]["kurtosis"]) for o in outliers) / len(outliers),
        "attention_ratio_max": max(ratio(o, "attention") for o in outliers),
        "retrieval_accuracy": retrieval["accuracy"],
        "answer_mass_max": max(retrieval["answer_mass"]),
        "noise_mass_mean": sum(retrieval["noise_mass"]) / len(retrieval["noise_mass"]),
        **{f"dloss {name}": delta for name, delta in rows.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="cpu")
    parser.add_argument("--work", type=Path, default=Path("demo-output/value-experiment"))
    parser.add_argument("--only", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, help="Override the size's steps.")
    args = parser.parse_args()
    size = dict(SIZES[args.size], **({"steps": args.steps} if args.steps else {}))

    from netmorph.sources import bundled_model_file

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    # ~4 characters per token: about eval_blocks blocks of held-out text
    train_text, heldout_text = write_texts(work, 4 * size["eval_blocks"] * size["sequence_len"])
    steps = size["steps"]
    settings = {"datasets": [{"path": str(train_text), "type": "completion"}],
                "test_datasets": [{"path": str(heldout_text)}], "sequence_len": size["sequence_len"],
                "micro_batch_size": size["batch"], "max_steps": steps, "learning_rate": size["learning_rate"],
                "lr_scheduler": "cosine", "warmup_steps": max(1, steps // 20), "logging_steps": max(1, steps // 30),
                "eval_steps": max(1, steps // 4), "seed": 0}
    results = {}
    started = time.perf_counter()
    for name in args.only:
        recipe = MODELS[name]
        base = bundled_model_file()
        config = {**settings, "base_model": str(base), "output_dir": str(work / name)}
        if recipe is not None:
            command, flags = recipe
            start_dir = work / f"{name}-start"
            run(command, "--output-dir", start_dir, "--force", "--no-verify", *flags)
            if command == "convert-diff-transformer":
                config = {**yaml.safe_load((start_dir / "config.yml").read_text()), **config,
                          "diff_attn_log_every": max(1, steps // 30), "diff_attn_num_monitor_layers": 3}
                # λ = 0 and DIFF V2 need no warm-up; the paper's λ_init gets a long one (75 % of the steps).
                config["diff_attn_warmup_steps"] = int(steps * 0.75) if name == "v1-paper-warmup" else 0
            config["base_model"] = str(start_dir)
        path = work / f"{name}.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        t0 = time.perf_counter()
        texts = {"heldout": heldout_text, "apache": Path(APACHE)}
        before = measure(Path(config["base_model"]), texts, size, work / "probes" / f"{name}-before")
        if (work / name).exists():
            shutil.rmtree(work / name)  # a fresh run: no resume from an earlier experiment's checkpoints
        t1 = time.perf_counter()
        run("train", path, "--no-progress")
        t2 = time.perf_counter()
        after = measure(work / name, texts, size, work / "probes" / f"{name}-after")
        row = {"heldout_before": before["losses"]["heldout"], "apache_before": before["losses"]["apache"],
               "probes_before": before["probes"], "heldout_after": after["losses"]["heldout"],
               "apache_after": after["losses"]["apache"], "probes_after": after["probes"],
               "train_seconds": t2 - t1, "total_seconds": time.perf_counter() - t0}
        results[name] = row
        (work / "results.json").write_text(json.dumps({"size": args.size, **size, "results": results}, indent=2))

    from netmorph.plot import plot_probes, plot_training
    from netmorph.probes import report_from_dict

    runs = [work / name for name in MODELS if (work / name / "trainer_state.json").exists()]
    plot_training(runs, work / "curves.png")
    reports = [report_from_dict(json.loads((work / "probes" / f"{n}-after" / "probe.json").read_text()))
               for n in MODELS if (work / "probes" / f"{n}-after" / "probe.json").exists()]
    combined = reports[0]
    for report, name in zip(reports, [n for n in MODELS if (work / "probes" / f"{n}-after").exists()]):
        report.models[0].model = name
    combined.models = [r.models[0] for r in reports]
    plot_probes(combined, work / "probes.png")
    table = markdown(results, args.size, size, time.perf_counter() - started)
    (work / "results.md").write_text(table)
    print(table)
    print(f"wrote {work / 'results.json'}, {work / 'results.md'}, {work / 'curves.png'}, {work / 'probes.png'}")


def markdown(results: dict, size_name: str, size: dict, seconds: float) -> str:
    tokens = size["steps"] * size["batch"] * size["sequence_len"]
    lines = [f"{size_name} size: {size['steps']} steps × {size['batch']} × {size['sequence_len']} tokens "
             f"({tokens} training tokens per model), lr {size['learning_rate']}, fp32; {seconds / 60:.0f} min in all",
             "",
             "| model | held-out loss before → after | Apache-2.0 loss before → after | retrieval acc before → after "
             "| max answer mass after | max residual max/median before → after | mean residual kurtosis after "
             "| Δloss int8 / int4 weights | Δloss A8 / A6 / A4 | train time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        b, a = r["probes_before"], r["probes_after"]
        lines.append(
            f"| {name} | {r['heldout_before']:.4f} → {r['heldout_after']:.4f} | {r['apache_before']:.4f} → "
            f"{r['apache_after']:.4f} | {b['retrieval_accuracy']:.2f} → {a['retrieval_accuracy']:.2f} | "
            f"{a['answer_mass_max']:.3f} | {b['residual_ratio_max']:.0f} → {a['residual_ratio_max']:.0f} | "
            f"{a['residual_kurtosis_mean']:.1f} | {a['dloss weights int8']:+.4f} / {a['dloss weights int4']:+.4f} | "
            f"{a['dloss activations 8-bit']:+.3f} / {a['dloss activations 6-bit']:+.3f} / "
            f"{a['dloss activations 4-bit']:+.3f} | {r['train_seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
