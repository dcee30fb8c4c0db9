"""Options as pydantic models: one source of truth for CLI flags, YAML keys, validation and help text."""

import difflib
import re
import types
from typing import Literal, Union, get_args, get_origin

import click
from pydantic import (BaseModel, ByteSize, ConfigDict, Field, TypeAdapter, ValidationError, field_validator,
                      model_validator)

from netmorph.errors import NetmorphError


def _one_line(error: ValidationError, where: str) -> NetmorphError:
    """The first validation error as one line naming the key; a model-level check's own message as it is."""
    first = error.errors()[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    if not first["loc"]:
        return NetmorphError(message if where == "invalid option" else f"{where}: {message}")
    key = ".".join(str(part) for part in first["loc"])
    return NetmorphError(f"{where}: {key}: {message}")


def size_in_bytes(text: str) -> int:
    """"500MB", "5GB", "2GiB" → bytes (pydantic's ByteSize: KB = 1000 B, KiB = 1024 B). Raises ValueError naming the
    text for anything else (no size of 0 bytes either)."""
    try:
        size = int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        size = 0
    if size <= 0:
        raise ValueError(f"not a size: {text!r} (examples: 500MB, 5GB, 2GiB)")
    return size


class CheckpointOptions(BaseModel):
    """What every command that writes a checkpoint takes: seed, verification, output and input safety."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    seed: int = Field(0, description="Seed of every random init (same seed, same bytes).")
    debug: bool = Field(False, description="Log each changed layer, compare losses, logits and greedy text on a sample.")
    force: bool = Field(False, description="Replace a non-empty output directory.")
    verify: bool = Field(True, description="Run the original and the new model on real text and record the figures in the model card.")
    max_shard_size: str = Field("5GB", description="Largest safetensors shard written (e.g. 500MB, 5GB).")
    allow_pickle: bool = Field(False, description="Allow loading .bin/.pt pickle weights (with torch.load(weights_only=True)).")
    trust_remote_code: bool = Field(False, description="Allow a source that needs its own model code.")
    progress: bool = Field(True, description="Byte progress bar on stderr while writing (only on a terminal).")
    verify_mode: Literal["auto", "full", "layerwise"] = Field("auto", description="full: both whole models in memory, with greedy generation. layerwise: one decoder layer of each model at a time (models larger than RAM; same depth and width). auto: layerwise when two fp32 copies would not fit in half the available memory.")

    @field_validator("max_shard_size")
    @classmethod
    def _valid_size(cls, value: str) -> str:
        size_in_bytes(value)
        return value

    @property
    def max_shard_bytes(self) -> int:
        """`max_shard_size` in bytes (KB = 1000 B, KiB = 1024 B)."""
        return size_in_bytes(self.max_shard_size)

    @classmethod
    def build(cls, **values):
        """The options from CLI values (None: not given, the default holds); a bad value → one-line NetmorphError."""
        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as e:
            raise _one_line(e, "invalid option") from None


class ConvertOptions(CheckpointOptions):
    """Options of `netmorph convert-diff-transformer`."""

    negative_init: Literal["normal", "zero", "mirror"] = Field("normal", description="Init of the new negative q/k (all exact while mix=0). normal: small zero-mean normal (--negative-std). zero: zeros (but zero q2 AND zero k2 is a saddle: neither gets a gradient). mirror: copies of the positive q/k.")
    negative_std: float = Field(0.02, gt=0, description="Std of the small zero-mean normal init of the negative q/k (--negative-init normal, the default; refused with the other inits).")
    split_heads: bool = Field(False, description="Use half of the existing heads as the negative component (approximate; needs even head counts).")
    sublayer_norm: bool = Field(False, description="Add the paper's per-head RMSNorm before o_proj (approximate).")
    lambda_start: Literal["paper", "zero"] = Field("paper", description="paper: λ_init=0.8−0.6·exp(−0.3·l), random λ vectors. zero: λ is exactly 0 at any mix yet trainable.")
    lambda_std: float = Field(0.1, ge=0, description="Std of the normal init of the λ vectors.")
    tolerance: float = Field(1e-4, gt=0, description="Max |Δlogit| (fp32) that counts as exact in the verification.")
    variant: Literal["v1", "v2"] = Field("v1", description="v1: the paper's differential attention (λ vectors, λ_init, mix). v2: DIFF V2 — 2H query heads in one attention call, K/V unchanged, per-token λ = sigmoid(lambda_proj(x)); exact from paired heads.")
    export: Literal["netmorph", "diffllama"] = Field("netmorph", description="netmorph: netmorph's differential-attention model (exact; remote code). diffllama: a stock transformers DiffLlama checkpoint (no remote code; approximate, divergence measured).")
    diffllama_anchor: float = Field(100.0, ge=0, description="--export diffllama: value anchor that keeps DiffLlama's per-head RMSNorm nearly linear (larger: closer to the source, slower o_proj learning; 0: no anchor).")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values):
        """netmorph ≤ 0.2 spelled the negative init as two booleans: name the replacement instead of "extra key"."""
        if isinstance(values, dict):
            for old, mode in (("zero_init", "zero"), ("mirror_weights", "mirror")):
                if values.get(old):
                    raise ValueError(f"{old} was replaced by negative_init: use --negative-init {mode} "
                                     f"(Python: ConvertOptions(negative_init=\"{mode}\"))")
                values = {k: v for k, v in values.items() if k != old or v is None}
        return values

    @model_validator(mode="after")
    def _compatible(self):
        if self.export == "diffllama":
            conflicting = [flag for flag, on in (("--split-heads", self.split_heads), ("--sublayer-norm", self.sublayer_norm),
                                                 ("--lambda-start zero", self.lambda_start == "zero")) if on]
            if conflicting:
                raise ValueError(f"{conflicting[0]} does not apply to --export diffllama (DiffLlama fixes its layout, "
                                 "norm and λ_init): drop it or drop --export diffllama")
            if self.verify_mode == "layerwise":
                raise ValueError("--export diffllama verifies the whole model: drop --verify-mode layerwise")
        if self.variant == "v2":
            conflicting = [flag for flag, on in (("--split-heads", self.split_heads), ("--sublayer-norm", self.sublayer_norm),
                                                 (f"--negative-init {self.negative_init}", self.negative_init != "normal"),
                                                 ("--lambda-start zero", self.lambda_start == "zero"),
                                                 ("--export diffllama", self.export == "diffllama")) if on]
            if conflicting:
                raise ValueError(f"{conflicting[0]} does not apply to --variant v2 (its negative heads are mirrored "
                                 "query heads and λ = sigmoid(lambda_proj(x))): drop it or drop --variant v2")
        if "negative_std" in self.model_fields_set and (self.negative_init != "normal" or self.variant == "v2"
                                                       or self.split_heads):
            used_by = ("--variant v2" if self.variant == "v2" else "--split-heads" if self.split_heads
                       else f"--negative-init {self.negative_init}")
            raise ValueError(f"--negative-std sets the std of --negative-init normal, which {used_by} does not use: "
                             "drop --negative-std")
        if self.split_heads and self.negative_init != "normal":
            raise ValueError(f"--split-heads reuses existing heads as the negative component: drop --negative-init "
                             f"{self.negative_init}")
        return self

    @property
    def diff_layout(self) -> str:
        """The converted model's attention layout: "doubled", "split" (--split-heads) or "v2" (--variant v2)."""
        return "v2" if self.variant == "v2" else "split" if self.split_heads else "doubled"

    @property
    def exact(self) -> bool:
        """Whether this conversion computes the source's function (its verification must pass): False with
        --split-heads, --sublayer-norm or --export diffllama."""
        return not (self.split_heads or self.sublayer_norm or self.export == "diffllama")


QKV_LAYOUT_TARGETS = ("separate", "sequential", "interleaved", "grouped")


class QkvLayoutOptions(CheckpointOptions):
    """Options of `netmorph qkv-layout`."""

    to: Literal["separate", "sequential", "interleaved", "grouped"] | None = Field(None, description="Target layout of the q/k/v projections (required): separate (Llama q/k/v_proj), sequential ([Q|K|V]: Phi-3, GPT-2), interleaved (per head [q,k,v]: GPT-NeoX; needs as many KV heads as query heads), grouped (per KV group: Falcon).")
    allow_non_stock: bool = Field(False, description="Also write a layout no stock transformers class reads (e.g. GPT-NeoX --to sequential); config.json records netmorph_qkv_layout.")
    tolerance: float = Field(1e-5, gt=0, description="Max |Δlogit| (fp32) the logit verification accepts when a stock class reads the output.")

    @model_validator(mode="after")
    def _has_target(self):
        if self.to is None:
            raise ValueError(f"no target layout: pass --to with one of {', '.join(QKV_LAYOUT_TARGETS)}")
        return self


class DiffAttnArgs(BaseModel):
    """The differential-attention training keys of the YAML (the seed README's names). Shared by `netmorph train`
    and the axolotl plugin, which merges this class into axolotl's config schema."""

    diff_attention: bool | None = Field(None, description="The model uses differential attention (set by the converter).")
    diff_attn_warmup_steps: int | None = Field(None, ge=0, description="Linear warm-up of the mix from 0 to 1 over this many optimizer steps; unset or 0: mix = 1 from the first step.")
    diff_attn_log_every: int | None = Field(None, ge=1, description="Log differential-attention metrics every N optimizer steps; unset: no metrics.")
    diff_attn_num_monitor_layers: int = Field(3, ge=1, description="How many layers to monitor, strided over the depth (needs diff_attn_log_every).")


GROWTH_FIELDS = ("num_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "hidden_size")


class GrowOptions(CheckpointOptions):
    """Options of `netmorph grow`. Every size is the target size; leave a size out to keep it."""

    num_layers: int | None = Field(None, gt=0, description="Target number of layers (new layers add nothing until trained).")
    intermediate_size: int | None = Field(None, gt=0, description="Target MLP intermediate size.")
    num_attention_heads: int | None = Field(None, gt=0, description="Target number of query heads.")
    num_key_value_heads: int | None = Field(None, gt=0, description="Target number of key/value heads.")
    head_dim: int | None = Field(None, gt=0, description="Target head dimension (RoPE pairing kept; rope_theta or partial_rotary_factor adjusted).")
    hidden_size: int | None = Field(None, gt=0, description="Target hidden size (zero-fill for RMSNorm, mean-fill for LayerNorm models).")
    new_layers_at: str = Field("append", description="Where new layers go: append, interleave, or comma-separated source layer indices each new layer follows (e.g. 3,7,11).")
    layer_init: Literal["copy", "normal"] = Field("copy", description="New layers: copy the layer they follow (Llama Pro) or draw fresh normal weights; their output projections start at zero either way.")
    init_std: float | None = Field(None, gt=0, description="Std of the new random weights [default: each grown tensor's own std].")
    dtype: Literal["source", "float32", "bfloat16", "float16"] = Field("source", description="Dtype of the grown checkpoint. source: the source's; a bf16/fp16 source grown in hidden size or head_dim then holds rescaled weights rounded to it (verified against the source's own rounding in that dtype); float32 keeps them exact.")
    tolerance: float = Field(1e-4, gt=0, description="Max |Δlogit| that counts as exact in the verification (in --verify-dtype).")
    verify_dtype: Literal["float64", "float32"] = Field("float64", description="Precision both models run in for the verification. float64 measures the checkpoint itself; float32 adds the model's own run-to-run rounding noise (~1e-4 on SmolLM2: eager vs sdpa differ that much).")

    @property
    def output_dtype(self):
        """The torch dtype of `--dtype`, None for "source" (each tensor keeps its dtype)."""
        import torch

        return None if self.dtype == "source" else getattr(torch, self.dtype)

    @field_validator("new_layers_at")
    @classmethod
    def _valid_positions(cls, value: str) -> str:
        value = value.strip()
        if value in ("append", "interleave") or re.fullmatch(r"\d+(\s*,\s*\d+)*", value):
            return value
        raise ValueError(f"--new-layers-at {value!r}: use append, interleave, or source layer indices like 3,7,11")

    @model_validator(mode="after")
    def _something_to_grow(self):
        if all(getattr(self, name) is None for name in GROWTH_FIELDS):
            flags = ", ".join("--" + name.replace("_", "-") for name in GROWTH_FIELDS)
            raise ValueError(f"nothing to grow: pass at least one of {flags}")
        return self

    @classmethod
    def build(cls, **values) -> "GrowOptions":
        """The options from CLI values (None: not given, the default holds). Raises NetmorphError: a model-level
        check's message as it is (e.g. "nothing to grow"), any other invalid value as one line naming the key."""
        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as e:
            first = e.errors()[0]
            if first["type"] == "value_error":
                raise NetmorphError(str(first["msg"]).removeprefix("Value error, ")) from None
            raise _one_line(e, "invalid option") from None


TRAINING_KEYS = tuple(name for name in DiffAttnArgs.model_fields if name.startswith("diff_attn_"))


class DatasetEntry(BaseModel):
    """One entry of `datasets:` — a local file. .txt is raw text; .jsonl/.json and .parquet rows give `field`."""

    model_config = ConfigDict(extra="allow")

    path: str
    type: str | None = Field(None, description="axolotl's dataset type; netmorph reads plain text (completion).")
    field: str = "text"


FSDP_SHARDING = ("full_shard", "shard_grad_op", "auto_wrap", "offload")


class FsdpConfig(BaseModel):
    """`fsdp_config:` of a training YAML, with axolotl's key names (axolotl/utils/schemas/fsdp.py; a `fsdp_` prefix
    is accepted as in older axolotl configs). netmorph passes them to the Hugging Face Trainer, which builds
    accelerate's FullyShardedDataParallelPlugin from them (FSDP2, `torch.distributed.fsdp.fully_shard`)."""

    model_config = ConfigDict(extra="forbid")

    fsdp_version: int = Field(2, description="2: FSDP2 (fully_shard), the only version netmorph trains with.")
    reshard_after_forward: bool = Field(True, description="true: full shard (ZeRO-3-like); false: keep parameters gathered between forward and backward (ZeRO-2-like).")
    state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"] = Field("SHARDED_STATE_DICT", description="Format of the checkpoint-N folders: one file per rank (sharded, torch.distributed.checkpoint) or one gathered file. The final model in output_dir is always a consolidated safetensors checkpoint.")
    auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"] = Field("TRANSFORMER_BASED_WRAP", description="Which modules become FSDP units (default: each decoder layer, from the model's _no_split_modules).")
    transformer_layer_cls_to_wrap: str | None = Field(None, description="Decoder layer class name(s) to wrap, comma-separated (default: the model's _no_split_modules).")
    min_num_params: int | None = Field(None, ge=1, description="SIZE_BASED_WRAP: the smallest module that becomes an FSDP unit.")
    offload_params: bool = Field(False, description="Offload parameters and gradients to CPU memory.")
    activation_checkpointing: bool = Field(False, description="FSDP's own activation checkpointing of each wrapped layer (prefer it to gradient_checkpointing under FSDP).")
    cpu_ram_efficient_loading: bool = Field(False, description="Load the weights on rank 0 only and broadcast them.")

    @model_validator(mode="before")
    @classmethod
    def _axolotl_spellings(cls, data):
        if not isinstance(data, dict):
            return data
        data = {(str(k)[5:] if str(k).startswith("fsdp_") and str(k) != "fsdp_version" else k): v for k, v in data.items()}
        if "version" in data:
            data["fsdp_version"] = data.pop("version")
        return data

    @model_validator(mode="after")
    def _supported(self):
        if self.fsdp_version != 2:
            raise ValueError(f"fsdp_version {self.fsdp_version}: netmorph trains with FSDP2 only (transformers "
                             "deprecated FSDP1): set fsdp_version: 2")
        if self.auto_wrap_policy == "SIZE_BASED_WRAP" and self.min_num_params is None:
            raise ValueError("auto_wrap_policy SIZE_BASED_WRAP needs min_num_params")
        return self

    def trainer_config(self) -> dict:
        """The `TrainingArguments.fsdp_config` dict (transformers' key names, training_args.py
        `_process_fsdp_args`)."""
        config = {"version": self.fsdp_version, "reshard_after_forward": self.reshard_after_forward,
                  "state_dict_type": self.state_dict_type, "auto_wrap_policy": self.auto_wrap_policy,
                  "cpu_offload": self.offload_params, "activation_checkpointing": self.activation_checkpointing,
                  "cpu_ram_efficient_loading": self.cpu_ram_efficient_loading}
        if self.transformer_layer_cls_to_wrap:
            config["transformer_layer_cls_to_wrap"] = [n.strip() for n in self.transformer_layer_cls_to_wrap.split(",")]
        if self.min_num_params:
            config["min_num_params"] = self.min_num_params
        return config


class TrainingYaml(DiffAttnArgs):
    """The keys netmorph reads from an axolotl-style YAML; every other key is kept as it is (axolotl has hundreds)."""

    model_config = ConfigDict(extra="allow")

    base_model: str
    output_dir: str | None = None
    datasets: list[DatasetEntry] | None = None
    test_datasets: list[DatasetEntry] | None = None
    val_set_size: float = Field(0.0, ge=0, lt=1)
    sequence_len: int = Field(512, ge=2)
    micro_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    num_epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler: str = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: str = "adamw_torch"
    logging_steps: int = Field(10, ge=1)
    save_steps: int | None = Field(None, ge=1)
    save_total_limit: int | None = Field(None, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    seed: int = 42
    report_to: str | list[str] = "none"
    # Precision, with axolotl's keys: bf16 / fp16 train with automatic mixed precision (fp32 master weights);
    # bfloat16 / float16 / float32 load, train and save the model in that dtype. The saved model keeps the base
    # model's dtype unless one of the last three says otherwise.
    bf16: bool | Literal["auto"] = False
    fp16: bool = False
    bfloat16: bool = False
    float16: bool = False
    float32: bool = False
    gradient_checkpointing: bool = False
    resume_from_checkpoint: str | None = None
    auto_resume_from_checkpoints: bool = False
    trust_remote_code: bool = False
    # Distributed training, with axolotl's keys. The processes themselves come from the launcher
    # (`accelerate launch`, torchrun); these keys choose how the model is spread over them.
    fsdp_config: FsdpConfig | None = None
    fsdp_version: int | None = None
    fsdp: list[str] | str | bool | None = None
    deepspeed: str | dict | None = None

    @model_validator(mode="after")
    def _one_strategy(self):
        if self.deepspeed is not None and not self.deepspeed:
            raise ValueError(f"deepspeed is empty ({self.deepspeed!r}): point it at a DeepSpeed JSON file "
                             "(examples/distributed/deepspeed_zero3.json) or drop the key")
        if self.fsdp_version is not None and self.fsdp_config is None and not self.fsdp:
            raise ValueError(f"fsdp_version {self.fsdp_version} without fsdp_config would train without FSDP: add "
                             "fsdp_config (examples/distributed/fsdp2.yml) or drop fsdp_version")
        if self.deepspeed and (self.fsdp or self.fsdp_config):
            raise ValueError("deepspeed and fsdp_config conflict: choose one distributed strategy")
        if self.fsdp and not self.fsdp_config:
            sharding = [self.fsdp] if isinstance(self.fsdp, str) else self.fsdp if isinstance(self.fsdp, list) else []
            unknown = [s for part in sharding for s in str(part).split() if s not in FSDP_SHARDING]
            if unknown:
                raise ValueError(f"fsdp: unknown option {unknown[0]!r}; known: {', '.join(FSDP_SHARDING)} "
                                 "(or use fsdp_config)")
        version = self.fsdp_version
        if version is not None and self.fsdp_config is not None and "fsdp_version" in self.fsdp_config.model_fields_set:
            if version != self.fsdp_config.fsdp_version:
                raise ValueError(f"fsdp_version {version} and fsdp_config.fsdp_version {self.fsdp_config.fsdp_version} conflict")
        if version is not None and version != 2:
            raise ValueError(f"fsdp_version {version}: netmorph trains with FSDP2 only (transformers deprecated "
                             "FSDP1): set fsdp_version: 2")
        return self

    @property
    def fsdp_settings(self) -> FsdpConfig | None:
        """The FSDP configuration the YAML asks for (`fsdp_config:`, or axolotl's legacy `fsdp: [full_shard,
        auto_wrap, offload]` list), None without FSDP."""
        if self.fsdp_config is not None:
            return self.fsdp_config
        if not self.fsdp:
            return None
        words = {w for part in ([self.fsdp] if isinstance(self.fsdp, str) else self.fsdp if isinstance(self.fsdp, list) else [])
                 for w in str(part).split()}
        return FsdpConfig(reshard_after_forward="shard_grad_op" not in words, offload_params="offload" in words)

    @model_validator(mode="after")
    def _no_unknown_netmorph_keys(self):
        """Other tools' keys pass through, but a key in netmorph's namespace (diff_attn*) or a near-miss of one of
        netmorph's keys is a typo that would otherwise be ignored silently."""
        known = [name for name in type(self).model_fields]
        for key in sorted(str(k) for k in (self.model_extra or {})):
            if key.startswith("diff_attn"):
                raise ValueError(f"unknown key {key!r}; known diff_attn keys: {', '.join(TRAINING_KEYS)}")
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.85)
            # A typo keeps the length (± 2); a longer key that extends a known one (axolotl's
            # gradient_checkpointing_kwargs) is another tool's key.
            if close and abs(len(key) - len(close[0])) <= 2 and not key.startswith(close[0]):
                raise ValueError(f"unknown key {key!r}: did you mean {close[0]!r}?")
        return self

    @classmethod
    def from_yaml(cls, data: dict, path) -> "TrainingYaml":
        """The YAML mapping `data` (already parsed) read from `path`, validated. Raises NetmorphError naming `path`
        and the first invalid key."""
        try:
            return cls.model_validate(data)  # not cls(**data): YAML keys may be numbers, null or booleans
        except ValidationError as e:
            raise _one_line(e, str(path)) from None


def _without_none(annotation):
    """`int | None` → int: an optional field is a plain flag that may be left out."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def click_options(model: type[BaseModel]):
    """Decorator adding one click option per field of `model`. Unset options arrive as None so the model's
    defaults stay the single source of truth."""

    def decorate(function):
        """Apply one click option per field of `model` to `function` and return it."""
        for name, field in reversed(model.model_fields.items()):
            flag = "--" + name.replace("_", "-")
            kwargs = {"default": None, "help": field.description}
            if field.annotation is bool:
                decls = [f"{flag}/--no-{flag[2:]}"]
            else:
                decls = [flag]
                annotation = _without_none(field.annotation)
                if get_origin(annotation) is Literal:
                    kwargs["type"] = click.Choice(get_args(annotation))
                else:
                    kwargs["type"] = annotation
                if field.default is not None:
                    kwargs["help"] = f"{field.description} [default: {field.default}]"
            function = click.option(*decls, name, **kwargs)(function)
        return function

    return decorate
