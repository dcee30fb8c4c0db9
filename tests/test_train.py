"""Training differential-attention models: the λ mix warm-up (incl. save/resume mid-warm-up), the metrics monitor
through TensorBoard, `netmorph train` / `evaluate` / `plot`, and the axolotl plugin with the real axolotl package."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from tests.helpers import convert, load, save_char_tokenizer, save_tiny_model
from netmorph.cli import main
from netmorph.sources import default_text_files
from netmorph.train.callbacks import mix_at, monitored_layers

pytestmark = pytest.mark.compat  # also run against the oldest and newest transformers (tests/compat.py)

WARMUP = 4


def test_mix_schedule_values():
    assert [mix_at(step, 4) for step in range(7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert mix_at(0, None) == mix_at(0, 0) == 1.0
    assert mix_at(333, 1000) == pytest.approx(0.333)


def test_monitored_layers_are_strided_over_the_depth():
    assert monitored_layers(30, 3) == [0, 14, 29]  # round(i·29/2): 0, 14.5 → 14 (banker's), 29
    assert monitored_layers(30, 1) == [0]
    assert monitored_layers(2, 5) == [0, 1]
    assert monitored_layers(10, 4) == [0, 3, 6, 9]


@pytest.fixture(scope="module")
def tiny_diff(tmp_path_factory):
    """A tiny Llama with a real character tokenizer, converted to differential attention (exact, mix = 0)."""
    root = tmp_path_factory.mktemp("train")
    save_tiny_model(root / "tiny", "llama")
    save_char_tokenizer(root / "tiny")
    convert(root / "tiny", root / "tiny-diff")
    return root


def write_config(root: Path, name: str, **changes) -> Path:
    """The converter's own config.yml, shortened to a few fast steps."""
    config = yaml.safe_load((root / "tiny-diff" / "config.yml").read_text())
    config.update(sequence_len=32, max_steps=6, diff_attn_warmup_steps=WARMUP, diff_attn_log_every=2,
                  diff_attn_num_monitor_layers=2, save_steps=2, report_to="tensorboard", logging_steps=1,
                  lr_scheduler="constant", learning_rate=1e-3, output_dir=str(root / name), **changes)
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def read_tensorboard(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, dict[int, float]] = {}
    event_dirs = {p.parent for p in run_dir.glob("runs/*/events.out.tfevents.*")}
    assert event_dirs, f"no TensorBoard event files under {run_dir}/runs"
    for directory in event_dirs:
        accumulator = EventAccumulator(str(directory))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            values.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    return values


@pytest.fixture(scope="module")
def full_run(tiny_diff):
    """`netmorph train` on the converter's config.yml: 6 steps, warm-up 4, checkpoints every 2 steps."""
    output = run_cli("train", write_config(tiny_diff, "run"), "--no-progress")
    assert "6 steps" in output and "mix 1" in output
    return tiny_diff / "run"


def test_train_writes_tensorboard_metrics_that_match_the_checkpoints(full_run):
    scalars = read_tensorboard(full_run)
    assert set(scalars["train/loss"]) == set(range(1, 7))
    # The mix reported after step s is the schedule's value for the next step: s / warm-up.
    assert scalars["train/diff_attn/mix"] == pytest.approx({2: 0.5, 4: 1.0, 6: 1.0})
    for step in (2, 4, 6):
        weights = load_file(full_run / f"checkpoint-{step}" / "model.safetensors")
        assert weights["model.layers.0.self_attn.mix"].item() == pytest.approx(min(1.0, step / WARMUP))
        vectors = {n: weights[f"model.layers.1.self_attn.{n}"] for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}
        lambda_1 = torch.exp((vectors["lambda_q1"] * vectors["lambda_k1"]).sum()).item()
        lambda_2 = torch.exp((vectors["lambda_q2"] * vectors["lambda_k2"]).sum()).item()
        lambda_init = weights["model.layers.1.self_attn.lambda_init"].item()
        assert scalars["train/diff_attn/layer_1/lambda_full"][step] == pytest.approx(lambda_1 - lambda_2 + lambda_init, rel=1e-5)
        assert scalars["train/diff_attn/layer_1/lambda_q1_norm"][step] == pytest.approx(vectors["lambda_q1"].norm().item(), rel=1e-5)
    for name in ("attn_pos_entropy", "attn_neg_entropy", "attn_diff_negative_fraction", "attn_pos_std"):
        assert set(scalars[f"train/diff_attn/layer_0/{name}"]) == {2, 4, 6}
    assert 0 < scalars["train/diff_attn/layer_0/attn_pos_entropy"][2] <= torch.log(torch.tensor(32.0)).item()
    assert {"train/diff_attn/lambda_full_mean", "train/diff_attn/lambda_full_min", "train/diff_attn/lambda_full_max"} <= set(scalars)
    assert "eval/loss" in scalars  # the converter's config.yml holds out a second real text


def test_checkpoint_saved_mid_warmup_reloads_with_its_mix(full_run):
    model = load(full_run / "checkpoint-2")
    assert all(layer.self_attn.mix.item() == pytest.approx(0.5) for layer in model.model.layers)
    assert all(layer.self_attn.mix.item() == 1.0 for layer in load(full_run).model.layers)


def test_resuming_mid_warmup_continues_the_schedule_exactly(full_run, tiny_diff):
    import shutil

    resumed = tiny_diff / "resumed"
    resumed.mkdir()
    shutil.copytree(full_run / "checkpoint-2", resumed / "checkpoint-2")
    run_cli("train", write_config(tiny_diff, "resumed"), "--resume", "--no-progress")
    state = json.loads((resumed / "trainer_state.json").read_text())
    mixes = {e["step"]: e["diff_attn/mix"] for e in state["log_history"] if "diff_attn/mix" in e}
    assert mixes == {2: 0.5, 4: 1.0, 6: 1.0}  # the history of checkpoint-2, then the resumed steps
    assert read_tensorboard(resumed)["train/diff_attn/mix"] == pytest.approx({4: 1.0, 6: 1.0})  # only 3..6 ran again
    assert state["global_step"] == 6
    reference, again = load_file(full_run / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert reference.keys() == again.keys()
    for name in reference:
        torch.testing.assert_close(again[name], reference[name], rtol=0, atol=1e-6, msg=name)


def test_evaluate_compare_of_an_exact_conversion_gives_equal_loss(tiny_diff):
    text = default_text_files()[0]
    output = run_cli("evaluate", tiny_diff / "tiny-diff", "--compare", tiny_diff / "tiny", "--dataset", text,
                     "--sequence-len", 64, "--max-blocks", 8, "--json")
    report = json.loads(output)
    first, second = report["results"]
    assert first["tokens"] == second["tokens"] == 8 * 63
    assert abs(report["loss_delta"]) <= 1e-4 and first["loss"] > 0
    table = run_cli("evaluate", tiny_diff / "tiny-diff" / "config.yml", "--dataset", text, "--sequence-len", 64,
                    "--max-blocks", 8)  # a training YAML evaluates its base_model
    assert f"{first['loss']:.5f}" in table


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_plot_training_and_attention_write_pngs_of_the_expected_size(full_run, tiny_diff, tmp_path):
    run_cli("plot", "training", full_run, "-o", tmp_path / "training.png")
    assert png_size(tmp_path / "training.png") == (1500, 450)
    run_cli("plot", "attention", full_run, "--prompt", "The quick brown fox.", "--layer", 1, "-o", tmp_path / "attn.png")
    assert png_size(tmp_path / "attn.png") == (1500, 500)
    assert (tmp_path / "attn.png").stat().st_size > 20_000 and (tmp_path / "training.png").stat().st_size > 20_000


def rendered(figure):
    """The figure's pixels (H, W, 3) as the PNG holds them, and a function from data coordinates of an axis to the
    pixel there."""
    import numpy as np

    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(int)

    def pixel(axis, x, y):
        column, row = axis.transData.transform((x, y))
        return image[image.shape[0] - 1 - int(round(row)), int(round(column))]

    return image, pixel


def near(pixel, colour, tolerance: int) -> bool:
    """Every channel within `tolerance` of `colour` (8-bit rounding of the colour map; anti-aliased lines blend)."""
    return max(abs(int(a) - int(b)) for a, b in zip(pixel, colour)) <= tolerance


def test_the_attention_plot_shows_the_maps_data(full_run):
    """The positive panel's brightest causal cell (head 0) is drawn in the colour map's top colour at that cell, a
    future (masked) cell in its bottom colour."""
    from matplotlib import colormaps
    from transformers import AutoTokenizer

    from netmorph.plot import attention_figure, attention_maps
    from netmorph.sources import resolve_source

    model = resolve_source(str(full_run)).load_model("sdpa")
    tokenizer = AutoTokenizer.from_pretrained(str(full_run))
    prompt = "The quick brown fox."
    figure = attention_figure(model, tokenizer, prompt, layer=1, head=0)
    _, pixel = rendered(figure)
    positive, _, _ = attention_maps(model, tokenizer(prompt, return_tensors="pt").input_ids, 1)
    causal = torch.ones_like(positive[0], dtype=torch.bool).tril()
    row, column = divmod(int(positive[0].masked_fill(~causal, -1).argmax()), positive.shape[-1])
    top, bottom = (tuple(round(255 * c) for c in colormaps["viridis"](v)[:3]) for v in (1.0, 0.0))
    positive_axis = figure.axes[0]
    assert near(pixel(positive_axis, column, row), top, 2)
    assert near(pixel(positive_axis, positive.shape[-1] - 1, 0), bottom, 2)  # the last key, seen by no early query


def test_the_training_plot_draws_each_run_over_its_steps(full_run):
    """The train-loss curve passes through its first and last logged points and ends there (white beyond)."""
    from matplotlib.colors import to_rgb

    from netmorph.plot import training_figure

    figure = training_figure([full_run])
    _, pixel = rendered(figure)
    loss_axis = figure.axes[0]
    line = next(line for line in loss_axis.lines if line.get_label().endswith("loss") and "eval" not in line.get_label())
    steps, losses = line.get_xdata(), line.get_ydata()
    colour = tuple(round(255 * c) for c in to_rgb(line.get_color()))
    for step, loss in ((steps[0], losses[0]), (steps[-1], losses[-1])):
        assert near(pixel(loss_axis, step, loss), colour, 12)
    span = steps[-1] - steps[0]
    assert near(pixel(loss_axis, steps[-1] + 0.1 * span, losses[-1]), (255, 255, 255), 0)
    assert near(pixel(loss_axis, steps[0] - 0.1 * span, losses[0]), (255, 255, 255), 0)


def test_plot_attention_rejects_a_model_without_differential_attention(tiny_diff, tmp_path):
    result = CliRunner().invoke(main, ["plot", "attention", str(tiny_diff / "tiny"), "-o", str(tmp_path / "a.png")])
    assert result.exit_code == 2 and "no differential attention" in result.output
    assert not (tmp_path / "a.png").exists()


def test_train_rejects_a_config_without_datasets(tiny_diff):
    path = write_config(tiny_diff, "nodata", datasets=None)
    result = CliRunner().invoke(main, ["train", str(path)])
    assert result.exit_code == 2 and "no datasets" in result.output


AXOLOTL_SCRIPT = """
import json, sys, yaml
from axolotl.integrations.base import PluginManager
from axolotl.utils.config import prepare_plugins, validate_config
from axolotl.utils.dict import DictDefault
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from netmorph.train.data import BlockDataset, pack, read_documents
from transformers import AutoTokenizer

cfg = DictDefault(yaml.safe_load(open(sys.argv[1]).read()))
prepare_plugins(cfg)
cfg = validate_config(cfg)  # axolotl's own schema, merged with the plugin's args class
manager = PluginManager.get_instance()
manager.pre_model_load(cfg)  # registers netmorph's classes: no trust_remote_code below
model = AutoModelForCausalLM.from_pretrained(cfg.base_model)
manager.post_model_load(cfg, model)
tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
blocks = pack(tokenizer, read_documents(cfg.datasets[0]["path"]), cfg.sequence_len)
args = TrainingArguments(output_dir=cfg.output_dir, max_steps=cfg.max_steps, logging_steps=1, report_to=[],
                         learning_rate=1e-3, disable_tqdm=True, save_strategy="no")
trainer = Trainer(model=model, args=args, train_dataset=BlockDataset(blocks))
for callback in manager.add_callbacks_post_trainer(cfg, trainer):
    trainer.add_callback(callback)
trainer.train()
mixes = {e["step"]: e["diff_attn/mix"] for e in trainer.state.log_history if "diff_attn/mix" in e}
print("RESULT" + json.dumps({"mixes": mixes, "keys": sorted(k for k in cfg if k.startswith("diff_attn")),
      "final_mix": float(model.model.layers[0].self_attn.mix)}))
"""


def test_axolotl_plugin_with_the_real_axolotl_package(tiny_diff, tmp_path):
    pytest.importorskip("axolotl", reason="axolotl is installed by `make test` (pip install --no-deps axolotl)")
    config = yaml.safe_load((tiny_diff / "tiny-diff" / "config.yml").read_text())
    assert "netmorph.integrations.axolotl.DifferentialTransformerPlugin" in config["plugins"]
    config.update(sequence_len=32, max_steps=4, diff_attn_warmup_steps=4, diff_attn_log_every=2,
                  output_dir=str(tmp_path / "axolotl-run"))
    path = tmp_path / "axolotl.yml"
    path.write_text(yaml.safe_dump(config))
    script = tmp_path / "run_axolotl.py"
    script.write_text(AXOLOTL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.split("RESULT", 1)[1])
    assert result["keys"] == ["diff_attn_log_every", "diff_attn_num_monitor_layers", "diff_attn_warmup_steps"]
    assert result["mixes"] == {"2": 0.5, "4": 1.0} and result["final_mix"] == 1.0

    config["diff_attn_warmup_steps"] = "soon"
    path.write_text(yaml.safe_dump(config))
    bad = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode != 0 and "diff_attn_warmup_steps" in bad.stderr


def test_datasets_read_text_jsonl_and_parquet_alike(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from netmorph.errors import NetmorphError
    from netmorph.train.data import read_documents

    documents = ["first document", "second one\nwith two lines"]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(documents)) + "\n\n")
    pq.write_table(pa.table({"body": documents}), tmp_path / "a.parquet")
    (tmp_path / "a.txt").write_text(documents[0])
    assert read_documents(tmp_path / "a.jsonl", "body") == documents
    assert read_documents(tmp_path / "a.parquet", "body") == documents
    assert read_documents(tmp_path / "a.txt") == [documents[0]]
    with pytest.raises(NetmorphError, match="no string field 'text'"):
        read_documents(tmp_path / "a.jsonl")
    with pytest.raises(NetmorphError, match="no column 'text'.*body"):
        read_documents(tmp_path / "a.parquet")
    with pytest.raises(NetmorphError, match="does not exist"):
        read_documents(tmp_path / "missing.txt")


def test_train_a_diff_v2_model_logs_its_per_token_lambda_and_plots(tiny_diff, tmp_path):
    """DIFF V2 trains through the same command and callbacks: no mix, λ = sigmoid(lambda_proj(x)) starts at 0.5 and
    its per-token statistics are logged; lambda_proj leaves zero; the attention plot draws the per-token λ."""
    convert(tiny_diff / "tiny", tiny_diff / "tiny-v2", variant="v2")
    config = yaml.safe_load(write_config(tiny_diff, "v2-run").read_text())
    config.update(base_model=str(tiny_diff / "tiny-v2"), max_steps=4, save_steps=4)
    path = tiny_diff / "v2-run.yml"
    path.write_text(yaml.safe_dump(config))
    run_cli("train", path, "--no-progress")
    scalars = read_tensorboard(tiny_diff / "v2-run")
    assert "train/diff_attn/mix" not in scalars
    assert set(scalars["train/diff_attn/layer_0/lambda_mean"]) == {2, 4}
    assert 0.3 < scalars["train/diff_attn/layer_0/lambda_mean"][2] < 0.7
    assert scalars["train/diff_attn/lambda_proj_norm_mean"][4] > 0  # lambda_proj trained away from 0
    weights = load_file(tiny_diff / "v2-run" / "checkpoint-4" / "model.safetensors")
    assert weights["model.layers.0.self_attn.lambda_proj.weight"].abs().max() > 0
    run_cli("plot", "attention", tiny_diff / "v2-run", "--prompt", "The quick brown fox.", "--layer", 1,
            "-o", tmp_path / "attn.png")
    assert png_size(tmp_path / "attn.png") == (1500, 500)
