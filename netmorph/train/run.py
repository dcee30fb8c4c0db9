"""`netmorph train` and `netmorph evaluate`: fine-tune and measure a model from an axolotl-style YAML.

Training is the Hugging Face Trainer with netmorph's callbacks, so `accelerate launch -m netmorph.cli train …` runs
it on several processes: DDP, or FSDP2 / DeepSpeed chosen by the YAML's axolotl keys (`fsdp_config`, `deepspeed`;
see `strategy_arguments`). What netmorph adds for several processes: the monitor gathers sharded λ parameters on
every rank and logs once, only the first process writes and reports, and the final model is one ordinary
safetensors checkpoint even under FSDP (`save_model`).
"""

import importlib.util
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass
from importlib.metadata import version as _version
from pathlib import Path

import torch
import torch.nn.functional as F

from netmorph.surgery.diff import MODELING_FILES
from netmorph.errors import NetmorphError
from netmorph.options import DatasetEntry, TrainingYaml
from netmorph.sources import Source, read_yaml, resolve_source
from netmorph.train.callbacks import DiffAttnMonitorCallback, DiffAttnWarmupCallback, diff_attention_modules
from netmorph.train.data import BlockDataset, pack, read_documents
from netmorph.verify.compare import clip_to_context, context_length

log = logging.getLogger("netmorph")


def load_training_yaml(path: str | Path) -> tuple[TrainingYaml, Source]:
    """The validated settings of a training YAML and its base model as a netmorph Source."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise NetmorphError(f"training config {path} does not exist: pass the config.yml written by the converter")
    settings = TrainingYaml.from_yaml(read_yaml(path), path)
    return settings, resolve_source(path, trust_remote_code=settings.trust_remote_code)


def dataset_blocks(tokenizer, entries: list[DatasetEntry], sequence_len: int, base: Path | None = None) -> torch.Tensor:
    """Packed (N, sequence_len) blocks of every dataset entry (relative paths are read from `base`)."""
    documents = []
    for entry in entries:
        path = Path(entry.path).expanduser()
        if not path.is_absolute() and base is not None and not path.exists():
            path = base / path
        documents += read_documents(path, entry.field)
    return pack(tokenizer, documents, sequence_len)


@dataclass
class TrainResult:
    """What `train` returns: the output directory, the optimizer steps done, the mean training loss, the final eval
    loss (None without eval data) and the final mix (None without a differential V1 model)."""

    output_dir: str
    global_step: int
    train_loss: float
    eval_loss: float | None
    final_mix: float | None
    main_process: bool = True  # False on every other rank of a multi-process run (only the first one reports)


def train(config_path: str | Path, max_steps: int | None = None, output_dir: str | None = None,
          resume: bool | str | None = None, progress: bool = True) -> TrainResult:
    """Fine-tune `base_model` on `datasets` as the YAML says, save the model (with its modeling code) in
    `output_dir`, and return the final figures."""
    from transformers import Trainer, TrainingArguments

    import netmorph.auto  # noqa: F401  (registers the differential-attention classes with the Auto classes)

    settings, source = load_training_yaml(config_path)
    config_dir = Path(config_path).expanduser().resolve().parent
    out = Path(output_dir or settings.output_dir or "").expanduser()
    if not str(out) or out == Path("."):
        raise NetmorphError(f"{config_path}: no output_dir: add `output_dir: DIR` to the YAML or pass --output-dir")
    if not settings.datasets:
        raise NetmorphError(f"{config_path}: no datasets: add `datasets: [{{path: FILE.txt, type: completion}}]`")
    if settings.val_set_size and settings.test_datasets:
        raise NetmorphError(f"{config_path}: val_set_size and test_datasets conflict: keep one of them")
    checkpoint = resume if resume is not None else settings.resume_from_checkpoint
    if checkpoint is None and settings.auto_resume_from_checkpoints:
        checkpoint = True
    if checkpoint is True and not saved_checkpoints(out):
        if resume is True:  # asked for on the command line: starting over instead would hide a wrong output_dir
            raise NetmorphError(f"--resume: {out} holds no checkpoint-N folder with a trainer_state.json to resume "
                                "from: drop --resume to start fresh, or pass the output_dir of the run to continue")
        checkpoint = None  # auto_resume_from_checkpoints with nothing saved yet: start fresh
    if isinstance(checkpoint, str):
        checkpoint = str(_checkpoint_folder(checkpoint, config_dir, config_path))

    precision = training_precision(settings, source, config_path)
    limit = context_length(source.config)
    if limit is not None and settings.sequence_len > limit:
        raise NetmorphError(f"{config_path}: sequence_len {settings.sequence_len} is longer than the model's context "
                            f"({limit} tokens, max_position_embeddings): set sequence_len to at most {limit}")
    tokenizer = source.load_tokenizer()
    blocks = dataset_blocks(tokenizer, settings.datasets, settings.sequence_len, config_dir)
    eval_blocks = None
    if settings.test_datasets:
        eval_blocks = dataset_blocks(tokenizer, settings.test_datasets, settings.sequence_len, config_dir)
    elif settings.val_set_size:
        held_out = max(1, int(len(blocks) * settings.val_set_size))
        if held_out >= len(blocks):
            raise NetmorphError(f"{config_path}: val_set_size {settings.val_set_size} leaves no training blocks")
        blocks, eval_blocks = blocks[:-held_out], blocks[-held_out:]

    model = source.load_model("sdpa").to(precision.train_dtype)
    model.config.use_cache = False
    is_diff = bool(diff_attention_modules(model))
    if settings.diff_attention and not is_diff:
        raise NetmorphError(f"{config_path}: diff_attention is true but {source.description} has no differential "
                            "attention: convert it first with `netmorph convert-diff-transformer`")

    steps = max_steps or settings.max_steps
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=settings.micro_batch_size,
        per_device_eval_batch_size=settings.micro_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_steps=steps or -1,
        num_train_epochs=settings.num_epochs,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        optim=settings.optimizer,
        logging_steps=settings.logging_steps,
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        save_total_limit=settings.save_total_limit,
        eval_strategy="steps" if eval_blocks is not None and settings.eval_steps else "no",
        eval_steps=settings.eval_steps,
        seed=settings.seed,
        report_to=settings.report_to,
        bf16=precision.bf16_autocast,
        fp16=precision.fp16_autocast,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not progress,
        dataloader_pin_memory=torch.cuda.is_available(),
        **_checkpointing_argument(TrainingArguments, settings.gradient_checkpointing),
        **strategy_arguments(settings, config_path, config_dir),
    )
    callbacks = []
    monitor = None
    if is_diff:
        callbacks.append(DiffAttnWarmupCallback(settings.diff_attn_warmup_steps))
        if settings.diff_attn_log_every:
            monitor = DiffAttnMonitorCallback(settings.diff_attn_log_every, settings.diff_attn_num_monitor_layers)
            callbacks.append(monitor)
    trainer = Trainer(
        model=model, args=args, train_dataset=BlockDataset(blocks),
        eval_dataset=None if eval_blocks is None else BlockDataset(eval_blocks), callbacks=callbacks,
    )
    if args.fsdp and not trainer.is_fsdp_enabled:
        raise NetmorphError(f"{config_path}: fsdp_config asks for FSDP, but accelerate {_version('accelerate')} "
                            "enables its FSDP plugin only on GPU-type devices and these are CPU processes (they would "
                            "train as plain DDP): run on GPUs, or drop fsdp_config")
    if monitor is not None:
        monitor.trainer = trainer

    result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_loss = trainer.evaluate()["eval_loss"] if eval_blocks is not None else None
    if trainer.is_world_process_zero():
        log.info("saving the model in %s (%s)", str(precision.save_dtype).removeprefix("torch."), precision.save_reason)
    save_model(trainer, source, out, precision.save_dtype)
    modules = diff_attention_modules(model)
    return TrainResult(str(out), trainer.state.global_step, result.training_loss, eval_loss,
                       modules[0].mix.item() if modules and hasattr(modules[0], "mix") else None,
                       trainer.is_world_process_zero())


@dataclass
class Precision:
    """The dtypes of a training run: `train_dtype` the model is cast to and trained in, `save_dtype` it is saved in
    (and why: `save_reason`), and whether bf16 / fp16 autocast (mixed precision) is on."""

    train_dtype: torch.dtype
    save_dtype: torch.dtype
    save_reason: str
    bf16_autocast: bool
    fp16_autocast: bool


HALF_DTYPES = (torch.bfloat16, torch.float16)


def training_precision(settings, source: Source, config_path) -> Precision:
    """The dtypes a run trains and saves in, from axolotl's precision keys (TrainingYaml), the hardware and the base
    model. Raises NetmorphError for a combination the machine cannot run (fp16 autocast without CUDA, two dtypes)."""
    pure = [name for name in ("bfloat16", "float16", "float32") if getattr(settings, name)]
    if len(pure) > 1 or (settings.bf16 is True and settings.fp16):
        chosen = pure + [name for name in ("bf16", "fp16") if getattr(settings, name) is True]
        raise NetmorphError(f"{config_path}: {' and '.join(chosen)} conflict: choose one precision")
    cuda = torch.cuda.is_available()
    if settings.fp16 and not cuda:
        raise NetmorphError(f"{config_path}: fp16: true needs a CUDA GPU (fp16 mixed precision), and this machine has "
                            "none: use bf16: true (bf16 autocast runs on the CPU) or drop fp16")
    bf16 = settings.bf16 is True or (settings.bf16 == "auto" and cuda and torch.cuda.is_bf16_supported())
    if bf16 and cuda and not torch.cuda.is_bf16_supported():
        raise NetmorphError(f"{config_path}: bf16: true needs a GPU with bf16 support (Ampere or newer): use fp16: true")
    if bf16 and not cuda:
        log.info("bf16: true on a machine without CUDA: training with CPU bf16 autocast")
    if pure:
        dtype = getattr(torch, pure[0])
        return Precision(dtype, dtype, f"{pure[0]}: true in the YAML", bf16, settings.fp16)
    base = source.stored_dtype()
    return Precision(torch.float32, base, "the base model's dtype; set float32: true in the YAML to keep fp32",
                     bf16, settings.fp16)


def saved_checkpoints(output_dir: Path) -> list[Path]:
    """The Trainer's checkpoint folders in `output_dir`: `checkpoint-<step>` folders holding a trainer_state.json."""
    return [p for p in output_dir.glob("checkpoint-*")
            if p.name.removeprefix("checkpoint-").isdigit() and (p / "trainer_state.json").is_file()]


def _checkpoint_folder(value: str, config_dir: Path, config_path) -> Path:
    """`resume_from_checkpoint` as a folder: relative to the current directory, else to the YAML's (as datasets
    are). Raises NetmorphError unless it holds the trainer_state.json every Trainer checkpoint has."""
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [path, config_dir / path]
    for candidate in candidates:
        if value.strip() and (candidate / "trainer_state.json").is_file():
            return candidate
    raise NetmorphError(f"{config_path}: resume_from_checkpoint {value!r} is not a Trainer checkpoint folder (no "
                        "trainer_state.json in it): point it at a checkpoint-N folder of an earlier run, or drop it")


def strategy_arguments(settings: TrainingYaml, config_path, config_dir: Path) -> dict:
    """The TrainingArguments that select the distributed strategy from the YAML's axolotl keys (`fsdp_config` /
    `fsdp_version` / legacy `fsdp`, or `deepspeed`); {} for plain data parallelism (DDP under a multi-process
    launcher, one process otherwise). Raises NetmorphError for a strategy this launch cannot run."""
    fsdp = settings.fsdp_settings
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if fsdp is not None:
        if processes < 2:
            raise NetmorphError(f"{config_path}: fsdp_config shards the model over several processes, and this is one "
                                "process: launch with `accelerate launch --num_processes N -m netmorph.cli train "
                                f"{config_path}` (N ≥ 2) or drop fsdp_config")
        return {"fsdp": True, "fsdp_config": fsdp.trainer_config()}
    if settings.deepspeed:
        if importlib.util.find_spec("deepspeed") is None:
            raise NetmorphError(f"{config_path}: deepspeed needs the deepspeed package: pip install deepspeed "
                                "(it builds CUDA kernels: a GPU machine), or drop the deepspeed key")
        config = settings.deepspeed
        if isinstance(config, str):
            path = Path(config).expanduser()
            if not path.is_absolute() and not path.exists():
                path = config_dir / path
            if not path.is_file():
                raise NetmorphError(f"{config_path}: deepspeed config {config} does not exist: point deepspeed at a "
                                    "DeepSpeed JSON file (examples/distributed/deepspeed_zero3.json)")
            config = str(path)
        return {"deepspeed": config}
    return {}


def _checkpointing_argument(arguments_class, enabled: bool) -> dict:
    """Activation checkpointing under its current name (`gradient_checkpointing` is deprecated in transformers 5.x)."""
    if not enabled:
        return {}
    fields = getattr(arguments_class, "__dataclass_fields__", {})
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": True}


def save_model(trainer, source: Source, out: Path, dtype: torch.dtype) -> None:
    """The final model in `dtype` (floating-point tensors; buffers such as the mix included), tokenizer and (for
    differential attention) its modeling code, loadable with `trust_remote_code=True` by stock transformers. Every
    process of a multi-process run calls it; the first one writes. Under FSDP2 the sharded parameters are gathered
    into the first process's CPU memory (accelerate's `get_state_dict`, a full state dict) and written as a normal
    safetensors checkpoint, whatever `fsdp_config.state_dict_type` the intermediate checkpoints use."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_fsdp_enabled:
        state_dict = trainer.accelerator.get_state_dict(trainer.model)  # a collective: every rank takes part
        if trainer.is_world_process_zero():
            aliases = _tied_aliases(model)
            state_dict = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor
                          for name, tensor in state_dict.items() if name not in aliases}
            model.save_pretrained(str(out), state_dict=state_dict)
            model.config.dtype = str(dtype).removeprefix("torch.")  # save_pretrained wrote the training dtype
            model.config.save_pretrained(str(out))
    elif trainer.is_deepspeed_enabled:
        trainer.save_model(str(out))  # ZeRO-3 partitions the parameters: DeepSpeed gathers them in its 16-bit dtype
    else:
        model.to(dtype)
        trainer.save_model(str(out))
    trainer.save_state()  # trainer_state.json: the log history `netmorph plot training` reads (first process)
    if trainer.is_world_process_zero():
        source.save_tokenizer(out)
        if source.kind == "hf":
            for name in MODELING_FILES:
                if (source.path / name).exists():
                    shutil.copy2(source.path / name, out / name)
    trainer.accelerator.wait_for_everyone()  # no process returns before the output directory is complete


def _tied_aliases(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are another name of an earlier parameter (tied embeddings: lm_head.weight). A
    gathered state dict holds separate copies of them, which save_pretrained would write twice."""
    seen, aliases = set(), set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            aliases.add(name)
        seen.add(id(parameter))
    return aliases


@dataclass
class EvalResult:
    """One model's figures from `evaluate`: its name, the predicted tokens, the token-weighted mean next-token loss
    (nats) and the perplexity exp(loss), with loss clipped at 700 before exp."""

    model: str
    tokens: int
    loss: float
    perplexity: float


@torch.no_grad()
def evaluate_loss(model, blocks: torch.Tensor, batch_size: int = 1) -> tuple[float, int]:
    """Token-weighted mean next-token loss of `model` over the blocks, and the number of predicted tokens."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        logits = model(batch, use_cache=False).logits.float()
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count, count


def evaluate(model_or_config: str, dataset: str, compare: str | None = None, sequence_len: int = 512,
             max_blocks: int | None = None, field: str = "text", batch_size: int = 1,
             trust_remote_code: bool = False) -> list[EvalResult]:
    """Loss and perplexity of one model, or of two on the same token blocks (tokenized by the first model)."""
    import netmorph.auto  # noqa: F401  (registers the differential-attention classes with the Auto classes)

    sources = [_evaluation_source(name, trust_remote_code) for name in [model_or_config] + ([compare] if compare else [])]
    tokenizer = sources[0].load_tokenizer()
    if compare:
        _check_same_vocab(tokenizer, sources[1], model_or_config, compare)
    sequence_len = clip_to_context(sequence_len, context_length(*(source.config for source in sources)),
                                   "evaluation blocks")
    blocks = pack(tokenizer, read_documents(dataset, field), sequence_len)[:max_blocks]
    results = []
    for name, source in zip([model_or_config, compare], sources):
        loss, tokens = evaluate_loss(source.load_model("sdpa"), blocks, batch_size)
        results.append(EvalResult(name, tokens, loss, math.exp(min(loss, 700))))
    return results


def _evaluation_source(name: str, trust_remote_code: bool) -> Source:
    if Path(name).suffix in (".yml", ".yaml"):
        return load_training_yaml(name)[1]
    return resolve_source(name, trust_remote_code=trust_remote_code)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def _check_same_vocab(tokenizer, other: Source, first: str, second: str) -> None:
    """Raise NetmorphError when `other` has a tokenizer of its own that tokenizes differently from `tokenizer`; a
    model directory without tokenizer files is evaluated on the first model's tokens. A tokenizer that is there but
    cannot be loaded raises Source.load_tokenizer's NetmorphError."""
    directory = Path(other.path)
    if directory.is_dir() and not any((directory / name).exists() for name in TOKENIZER_FILES):
        return
    other_tokenizer = other.load_tokenizer()
    probe = "The quick brown fox: 12345, naïve café."
    if len(other_tokenizer) != len(tokenizer) or other_tokenizer(probe).input_ids != tokenizer(probe).input_ids:
        raise NetmorphError(f"{first} and {second} tokenize text differently: losses are only comparable with the same tokenizer")


def results_table(results: list[EvalResult]) -> str:
    """The `evaluate` results as a text table (model, tokens, loss, perplexity), plus Δloss (second − first, absolute
    and relative) for two models."""
    lines = [f"{'model':<50} {'tokens':>8} {'loss':>10} {'ppl':>10}"]
    lines += [f"{r.model[-50:]:<50} {r.tokens:>8} {r.loss:>10.5f} {r.perplexity:>10.3f}" for r in results]
    if len(results) == 2:
        delta = results[1].loss - results[0].loss
        lines.append(f"Δloss (second − first) = {delta:+.3e} ({delta / results[0].loss:+.4%})")
    return "\n".join(lines)


def results_json(results: list[EvalResult]) -> str:
    """The `evaluate` results as JSON: {"results": [...]}, plus "loss_delta" for two models."""
    payload = {"results": [asdict(r) for r in results]}
    if len(results) == 2:
        payload["loss_delta"] = results[1].loss - results[0].loss
    return json.dumps(payload, indent=2)
