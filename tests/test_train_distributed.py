"""`netmorph train` on two processes (gloo, CPU), against the same run on one process with the same global batch.

One process: micro-batch 1 × 4 accumulation steps. Two processes: micro-batch 1 × 2 accumulation steps on each, so
every optimizer step sees the same 4 blocks (accelerate gives rank r every other micro-batch of the same seeded
order). Gradient checkpointing is on in every run. Launched with `accelerate launch --multi_gpu --num_processes 2`:
accelerate 1.15's `--cpu --num_processes 2` starts ONE process (its simple launcher; only an MPI hostfile gives it
several), while `--multi_gpu` takes torchrun, and the Trainer's `use_cpu` then makes the processes MULTI_CPU (gloo).
FSDP2 runs through tests/cpu_fsdp_launch.py (see there: accelerate enables FSDP only for GPU-type processes).
On a machine with 2 or more GPUs, `NETMORPH_DISTRIBUTED_DEVICE=cuda pytest tests/test_train_distributed.py` runs the
same comparisons on 2 GPUs (NCCL, accelerate's own FSDP switch, no launcher shim).

Measured on this machine (fp32, torch 2.13, accelerate 1.15, transformers 5.24): max |Δweight| 2 processes vs 1 is
3.8e-7 (DDP, V1), 3.7e-7 (FSDP2, V1) and 8.2e-7 (FSDP2, V2) after 4 AdamW steps at lr 1e-3; a resumed FSDP2 run
equals the uninterrupted one bit for bit. The bound is 5e-6: the gradients differ only in fp32 summation order
(all-reduce / reduce-scatter), but Adam divides by √v, which amplifies that rounding for entries with tiny
gradients; training on half the batch per step moves the weights by 5.4e-3 from the reference here.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from netmorph.cli import main
from tests.helpers import convert, save_char_tokenizer, save_tiny_model

# One xdist worker runs the whole module: its runs are shared fixtures (built once), and each run already takes both
# cores of this machine.
pytestmark = pytest.mark.xdist_group("train_distributed")

ROOT = Path(__file__).resolve().parent.parent
DEVICE = os.environ.get("NETMORPH_DISTRIBUTED_DEVICE", "cpu")  # "cuda": the same runs on 2 GPUs
WARMUP = 4
WEIGHT_TOLERANCE = 5e-6  # fp32, after 4 AdamW steps at lr 1e-3 (measured ≤ 8.2e-7)
TIMING_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos"}


@pytest.fixture(scope="module")
def models(module_tmp_path):
    """A tiny Llama with a character tokenizer, converted to V1 doubled heads (mix 0, warm-up pending) and V2."""
    save_tiny_model(module_tmp_path / "tiny", "llama")
    save_char_tokenizer(module_tmp_path / "tiny")
    convert(module_tmp_path / "tiny", module_tmp_path / "v1")
    convert(module_tmp_path / "tiny", module_tmp_path / "v2", variant="v2")
    return module_tmp_path


def write_config(root: Path, name: str, base: str, accumulation: int, **changes) -> Path:
    """The converter's own config.yml, cut to 4 optimizer steps of 4 blocks each (micro-batch 1)."""
    config = yaml.safe_load((root / "v1" / "config.yml").read_text())
    config.pop("test_datasets", None)  # no evaluation: it would only cost time here
    config.update(base_model=str(root / base), output_dir=str(root / name), sequence_len=32, micro_batch_size=1,
                  gradient_accumulation_steps=accumulation, max_steps=4, save_steps=2, logging_steps=1,
                  lr_scheduler="constant", learning_rate=1e-3, diff_attn_warmup_steps=WARMUP, diff_attn_log_every=2,
                  diff_attn_num_monitor_layers=2, gradient_checkpointing=True, float32=True, seed=0,
                  report_to="tensorboard", **changes)
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def cpu_environment() -> dict:
    """The processes' environment: this checkout's netmorph, one thread each, and no GPU even on a machine with one
    (two processes on one GPU would fail in NCCL; the references must run on the same device as the runs)."""
    hidden = {"CUDA_VISIBLE_DEVICES": ""} if DEVICE == "cpu" else {}
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **hidden}


def train_one_process(config: Path) -> str:
    run = subprocess.run([sys.executable, "-m", "netmorph.cli", "train", str(config), "--no-progress"],
                         capture_output=True, text=True, env=cpu_environment(), timeout=300, cwd=ROOT)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return run.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(*arguments, fsdp: bool = False, config_file: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`accelerate launch` of the netmorph CLI on 2 CPU processes (gloo); FSDP2 through tests/cpu_fsdp_launch.py.
    With `config_file`, an accelerate config of examples/distributed with its process count cut to 2."""
    program = [str(ROOT / "tests" / "cpu_fsdp_launch.py")] if fsdp and DEVICE == "cpu" else ["-m", "netmorph.cli"]
    where = (["--config_file", str(config_file)] if config_file else
             ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"])
    command = [sys.executable, "-m", "accelerate.commands.launch", *where, "--num_processes", "2",
               "--main_process_port", str(free_port()), *program, *map(str, arguments)]
    run = subprocess.run(command, capture_output=True, text=True, env=cpu_environment(), timeout=300, cwd=ROOT)
    assert run.returncode == 0 or not check, (run.stdout + run.stderr)[-4000:]
    return run


def log_history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "trainer_state.json").read_text())["log_history"]


def assert_same_weights(reference: Path, other: Path, tolerance: float = WEIGHT_TOLERANCE) -> None:
    expected, actual = load_file(reference / "model.safetensors"), load_file(other / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=tolerance, msg=name)


def assert_same_logs(reference: Path, other: Path) -> None:
    """The same entries in the same order (loss, grad norm, learning rate, every diff_attn figure), each once."""
    expected, actual = log_history(reference), log_history(other)
    assert [sorted(set(e) - TIMING_KEYS) for e in actual] == [sorted(set(e) - TIMING_KEYS) for e in expected]
    for want, got in zip(expected, actual):
        for key in set(want) - TIMING_KEYS - {"train_loss"}:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (want["step"], key)


def assert_logged_once(run_dir: Path, monitored: str) -> None:
    """One trainer_state entry per step and one TensorBoard event per step and tag: the first process logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = log_history(run_dir)
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4]
    assert [e["step"] for e in history if monitored in e] == [2, 4]
    event_files = list(run_dir.glob("runs/*/events.out.tfevents.*"))
    assert len(event_files) == 1, event_files  # one writer
    accumulator = EventAccumulator(str(event_files[0].parent))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in accumulator.Scalars(f"train/{monitored}")] == [2, 4]


@pytest.fixture(scope="module")
def v1_reference(models):
    """V1 on one process: 4 accumulation steps of 1 block."""
    train_one_process(write_config(models, "v1-one", "v1", accumulation=4))
    return models / "v1-one"


@pytest.fixture(scope="module")
def v1_fsdp(models):
    """V1 under FSDP2 (full shard, sharded checkpoints) on 2 processes, 2 accumulation steps each."""
    fsdp_config = {"fsdp_version": 2, "fsdp_config": {"state_dict_type": "SHARDED_STATE_DICT",
                                                      "reshard_after_forward": True}}
    config = write_config(models, "v1-fsdp", "v1", accumulation=2, **fsdp_config)
    run = launch("train", config, "--no-progress", fsdp=True)
    assert run.stdout.count("wrote ") == 1, run.stdout  # one report, from the first process
    return config, models / "v1-fsdp"


def test_ddp_on_two_processes_trains_like_one_process(models, v1_reference):
    run = launch("train", write_config(models, "v1-ddp", "v1", accumulation=2), "--no-progress",
                 config_file=ROOT / "examples" / "distributed" / "one_node_8gpu.yaml")
    assert run.stdout.count("wrote ") == 1, run.stdout
    ddp = models / "v1-ddp"
    assert_same_weights(v1_reference, ddp)
    assert_same_logs(v1_reference, ddp)
    assert_logged_once(ddp, "diff_attn/mix")
    mixes = {e["step"]: e["diff_attn/mix"] for e in log_history(ddp) if "diff_attn/mix" in e}
    assert mixes == {2: 0.5, 4: 1.0}  # the warm-up advanced once per optimizer step, not per micro-batch or rank
    assert load_file(ddp / "checkpoint-2" / "model.safetensors")["model.layers.0.self_attn.mix"].item() == 0.5


def test_fsdp2_on_two_processes_trains_like_one_process(v1_reference, v1_fsdp):
    _, fsdp = v1_fsdp
    assert_same_weights(v1_reference, fsdp)  # the final model: gathered into one ordinary safetensors file
    assert_same_logs(v1_reference, fsdp)  # λ figures of sharded parameters gathered on every rank, logged once
    assert_logged_once(fsdp, "diff_attn/mix")
    shards = fsdp / "checkpoint-2" / "pytorch_model_fsdp_0"
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one per rank
    assert not (fsdp / "checkpoint-2" / "model.safetensors").exists()


def test_fsdp2_resumed_from_a_sharded_checkpoint_ends_equal(models, v1_fsdp):
    """A run stopped after the sharded checkpoint-2 (its output folder holds only that checkpoint, as after a kill
    during step 3) and resumed with --resume ends with the uninterrupted run's weights and mix history."""
    config, fsdp = v1_fsdp
    resumed = models / "v1-fsdp-resumed"
    resumed.mkdir()
    shutil.copytree(fsdp / "checkpoint-2", resumed / "checkpoint-2")
    launch("train", config, "--output-dir", resumed, "--resume", "--no-progress", fsdp=True)
    assert_same_weights(fsdp, resumed)
    mixes = {e["step"]: e["diff_attn/mix"] for e in log_history(resumed) if "diff_attn/mix" in e}
    assert mixes == {2: 0.5, 4: 1.0}


def test_a_sharded_checkpoint_consolidates_into_a_loadable_checkpoint(models, v1_reference, v1_fsdp):
    """`netmorph consolidate` merges checkpoint-N's DCP shards: checkpoint-2 holds the mid-warm-up mix, checkpoint-4
    equals the final model; `netmorph verify` accepts it against the one-process run, and stock transformers loads
    it with trust_remote_code=True without netmorph."""
    config, fsdp = v1_fsdp
    refused = CliRunner().invoke(main, ["consolidate", str(config), str(fsdp / "checkpoint-2"), "-o",
                                        str(models / "merged-refused")], catch_exceptions=False)
    assert refused.exit_code == 2 and "is a pickle file" in refused.output and "--allow-pickle" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not (models / "merged-refused").exists()
    for step in (2, 4):
        result = CliRunner().invoke(main, ["consolidate", str(config), str(fsdp / f"checkpoint-{step}"), "-o",
                                           str(models / f"merged-{step}"), "--allow-pickle"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    taken = CliRunner().invoke(main, ["consolidate", str(config), str(fsdp / "checkpoint-2"), "-o",
                                      str(models / "merged-2"), "--allow-pickle"], catch_exceptions=False)
    assert taken.exit_code == 2 and "is not empty: pass --force" in taken.output
    unsharded = CliRunner().invoke(main, ["consolidate", str(config), str(v1_reference / "checkpoint-2"), "-o",
                                          str(models / "merged-unsharded")])
    assert unsharded.exit_code == 2 and "holds no sharded FSDP model" in unsharded.output
    assert len(unsharded.output.strip().splitlines()) == 1 and not (models / "merged-unsharded").exists()
    middle = load_file(models / "merged-2" / "model.safetensors")
    assert {middle[f"model.layers.{i}.self_attn.mix"].item() for i in (0, 1)} == {0.5}
    assert_same_weights(fsdp, models / "merged-4", tolerance=0)
    result = CliRunner().invoke(main, ["verify", str(v1_reference), str(models / "merged-4"), "--max-tokens", 64,
                                       "--new-tokens", 4], catch_exceptions=False)
    assert result.exit_code == 0 and "PASS" in result.output, result.output
    script = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)\n"
              "assert not any(n == 'netmorph' or n.startswith('netmorph.') for n in sys.modules)\n"
              "print('MIX', float(m.model.layers[0].self_attn.mix))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and Path(p).resolve() != ROOT),
           "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", script, str(models / "merged-2")], capture_output=True, text=True,
                         env=env, cwd=models, timeout=300)
    assert run.returncode == 0 and "MIX 0.5" in run.stdout, run.stderr[-3000:]


def test_diff_v2_under_fsdp2_trains_like_one_process(models):
    """DIFF V2 (lambda_proj sharded like every other Linear; no mix) under FSDP2 equals one process (measured 8.2e-7)."""
    train_one_process(write_config(models, "v2-one", "v2", accumulation=4))
    config = write_config(models, "v2-fsdp", "v2", accumulation=2, fsdp_version=2,
                          fsdp_config={"state_dict_type": "SHARDED_STATE_DICT"})
    launch("train", config, "--no-progress", fsdp=True)
    assert_same_weights(models / "v2-one", models / "v2-fsdp")
    assert_same_logs(models / "v2-one", models / "v2-fsdp")
    assert_logged_once(models / "v2-fsdp", "diff_attn/lambda_proj_norm_mean")
    assert load_file(models / "v2-fsdp" / "model.safetensors")["model.layers.0.self_attn.lambda_proj.weight"].abs().max() > 0


# ---- The strategy keys of the training YAML (axolotl's names), without launching processes ----

def yaml_settings(**keys):
    from netmorph.options import TrainingYaml

    return TrainingYaml.from_yaml({"base_model": "unused", **keys}, "config.yml")


def test_fsdp_keys_in_axolotl_spellings_reach_accelerates_plugin_as_written():
    """axolotl's fsdp_config (also with the older fsdp_ prefixes) → TrainingArguments → the FSDP plugin arguments
    transformers builds from them (its own `_process_fsdp_args`)."""
    from transformers import TrainingArguments

    settings = yaml_settings(fsdp_version=2, fsdp_config={
        "fsdp_offload_params": True, "fsdp_state_dict_type": "FULL_STATE_DICT", "reshard_after_forward": False,
        "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "activation_checkpointing": True})
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[], fsdp=True,
                             fsdp_config=settings.fsdp_settings.trainer_config())
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["cpu_offload"] is True and plugin["reshard_after_forward"] is False
    assert plugin["state_dict_type"] == "FULL_STATE_DICT" and plugin["activation_checkpointing"] is True
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    legacy = yaml_settings(fsdp=["shard_grad_op", "auto_wrap"]).fsdp_settings
    assert legacy.reshard_after_forward is False and legacy.state_dict_type == "SHARDED_STATE_DICT"
    assert yaml_settings().fsdp_settings is None


def test_the_example_fsdp_keys_also_validate_in_axolotls_own_schema():
    pytest.importorskip("axolotl", reason="axolotl is installed by `make test` (pip install --no-deps axolotl)")
    from axolotl.utils.schemas.fsdp import FSDPConfig

    keys = yaml.safe_load((ROOT / "examples" / "distributed" / "fsdp2.yml").read_text())
    assert keys["fsdp_version"] == 2
    theirs = FSDPConfig.model_validate(keys["fsdp_config"])
    ours = yaml_settings(**keys).fsdp_settings
    for name in keys["fsdp_config"]:
        assert getattr(theirs, name) == getattr(ours, name), name


@pytest.mark.parametrize("keys, message", [
    ({"fsdp_version": 1, "fsdp_config": {}}, "FSDP2 only"),
    ({"fsdp_config": {"version": 1}}, "FSDP2 only"),
    ({"fsdp_config": {"mixed_precision_policy": "bf16"}}, "fsdp_config.mixed_precision_policy"),
    ({"fsdp_config": {}, "deepspeed": "ds.json"}, "deepspeed and fsdp_config conflict"),
    ({"fsdp": ["full_shard", "hybrid"]}, "unknown option 'hybrid'"),
    ({"fsdp_config": {"auto_wrap_policy": "SIZE_BASED_WRAP"}}, "needs min_num_params"),
])
def test_bad_strategy_keys_are_refused_in_one_line(keys, message):
    from netmorph.errors import NetmorphError

    with pytest.raises(NetmorphError, match=message) as error:
        yaml_settings(**keys)
    assert "\n" not in str(error.value)


def test_fsdp_in_one_process_and_deepspeed_without_the_package_are_refused_in_one_line(models):
    """Before any model is loaded: FSDP needs a multi-process launch; DeepSpeed needs its package (not installed
    here: it builds CUDA kernels)."""
    import importlib.util

    fsdp = write_config(models, "fsdp-one-process", "v1", accumulation=1, fsdp_version=2, fsdp_config={})
    result = CliRunner().invoke(main, ["train", str(fsdp)])
    assert result.exit_code == 2 and "this is one process: launch with `accelerate launch" in result.output
    assert len(result.output.strip().splitlines()) == 1
    if importlib.util.find_spec("deepspeed") is None:
        (models / "ds.json").write_text("{}")
        deepspeed = write_config(models, "deepspeed", "v1", accumulation=1, deepspeed="ds.json")
        result = CliRunner().invoke(main, ["train", str(deepspeed)])
        assert result.exit_code == 2 and "needs the deepspeed package" in result.output


@pytest.mark.skipif(DEVICE != "cpu", reason="the refusal is for CPU processes; this run uses GPUs")
def test_fsdp_on_cpu_processes_is_refused_instead_of_silently_training_ddp(models):
    """accelerate 1.15 drops the FSDP plugin for CPU processes (MULTI_CPU) and would train plain DDP: netmorph stops
    with one line on each rank instead (the launcher adds its own traceback)."""
    config = write_config(models, "fsdp-cpu", "v1", accumulation=2, fsdp_version=2, fsdp_config={})
    run = launch("train", config, "--no-progress", check=False)
    assert run.returncode != 0
    assert run.stderr.count("enables its FSDP plugin only on GPU-type devices") == 2, run.stderr[-3000:]
    assert not (models / "fsdp-cpu" / "model.safetensors").exists()
