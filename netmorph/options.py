"""Options as pydantic models: one source of truth for CLI flags, YAML keys, validation and help text."""

import re
import types
from typing import Literal, Union, get_args, get_origin

import click
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from netmorph.errors import NetmorphError


def _one_line(error: ValidationError, where: str) -> NetmorphError:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "options"
    return NetmorphError(f"{where}: {key}: {first['msg']}")


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 500MB, 5GB, 2GiB)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(number * powers[unit])


class ConvertOptions(BaseModel):
    """Options of `netmorph convert-diff-transformer`."""

    model_config = ConfigDict(extra="forbid")

    zero_init: bool = Field(False, description="Negative q/k start at zero (exact; but zero q2 AND zero k2 is a saddle: neither gets a gradient).")
    mirror_weights: bool = Field(False, description="Negative q/k start as copies of the positive ones (exact while mix=0).")
    negative_std: float = Field(0.02, gt=0, description="Std of the small zero-mean normal init of the negative q/k (default mode).")
    split_heads: bool = Field(False, description="Use half of the existing heads as the negative component (approximate; needs even head counts).")
    sublayer_norm: bool = Field(False, description="Add the paper's per-head RMSNorm before o_proj (approximate).")
    lambda_start: Literal["paper", "zero"] = Field("paper", description="paper: λ_init=0.8−0.6·exp(−0.3·l), random λ vectors. zero: λ is exactly 0 at any mix yet trainable.")
    lambda_std: float = Field(0.1, ge=0, description="Std of the normal init of the λ vectors.")
    seed: int = Field(0, description="Seed of every random init (same seed, same bytes).")
    debug: bool = Field(False, description="Log each converted layer, compare losses, logits and greedy text on a sample.")
    force: bool = Field(False, description="Replace a non-empty output directory.")
    verify: bool = Field(True, description="Run original and converted on real text and record the figures in the model card.")
    tolerance: float = Field(1e-4, gt=0, description="Max |Δlogit| (fp32) that counts as exact in the verification.")
    max_shard_size: str = Field("5GB", description="Largest safetensors shard written (e.g. 500MB, 5GB).")
    allow_pickle: bool = Field(False, description="Allow loading .bin/.pt pickle weights (with torch.load(weights_only=True)).")
    trust_remote_code: bool = Field(False, description="Allow a source that needs its own model code.")

    @field_validator("max_shard_size")
    @classmethod
    def _valid_size(cls, value: str) -> str:
        parse_size(value)
        return value

    @model_validator(mode="after")
    def _compatible(self):
        if self.zero_init and self.mirror_weights:
            raise ValueError("--zero-init and --mirror-weights conflict: choose one negative-component init")
        if self.split_heads and (self.zero_init or self.mirror_weights):
            raise ValueError("--split-heads reuses existing heads as the negative component: drop --zero-init/--mirror-weights")
        return self

    @property
    def negative_init(self) -> str:
        return "zero" if self.zero_init else "mirror" if self.mirror_weights else "normal"

    @property
    def exact(self) -> bool:
        return not (self.split_heads or self.sublayer_norm)

    @classmethod
    def build(cls, **values) -> "ConvertOptions":
        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as e:
            first = e.errors()[0]
            if first["type"] == "value_error":
                raise NetmorphError(str(first["msg"]).removeprefix("Value error, ")) from None
            raise _one_line(e, "invalid option") from None


GROWTH_FIELDS = ("num_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "hidden_size")


class GrowOptions(BaseModel):
    """Options of `netmorph grow`. Every size is the target size; leave a size out to keep it."""

    model_config = ConfigDict(extra="forbid")

    num_layers: int | None = Field(None, gt=0, description="Target number of layers (new layers add nothing until trained).")
    intermediate_size: int | None = Field(None, gt=0, description="Target MLP intermediate size.")
    num_attention_heads: int | None = Field(None, gt=0, description="Target number of query heads.")
    num_key_value_heads: int | None = Field(None, gt=0, description="Target number of key/value heads.")
    head_dim: int | None = Field(None, gt=0, description="Target head dimension (RoPE pairing kept; rope_theta or partial_rotary_factor adjusted).")
    hidden_size: int | None = Field(None, gt=0, description="Target hidden size (zero-fill for RMSNorm, mean-fill for LayerNorm models).")
    new_layers_at: str = Field("append", description="Where new layers go: append, interleave, or comma-separated source layer indices each new layer follows (e.g. 3,7,11).")
    layer_init: Literal["copy", "normal"] = Field("copy", description="New layers: copy the layer they follow (Llama Pro) or draw fresh normal weights; their output projections start at zero either way.")
    init_std: float | None = Field(None, gt=0, description="Std of the new random weights [default: each grown tensor's own std].")
    seed: int = Field(0, description="Seed of every random init (same seed, same bytes).")
    debug: bool = Field(False, description="Log each grown layer, compare losses, logits and greedy text on a sample.")
    force: bool = Field(False, description="Replace a non-empty output directory.")
    verify: bool = Field(True, description="Run original and grown model on real text and record the figures in the model card.")
    tolerance: float = Field(1e-4, gt=0, description="Max |Δlogit| that counts as exact in the verification (in --verify-dtype).")
    verify_dtype: Literal["float64", "float32"] = Field("float64", description="Precision both models run in for the verification. float64 measures the checkpoint itself; float32 adds the model's own run-to-run rounding noise (~1e-4 on SmolLM2: eager vs sdpa differ that much).")
    max_shard_size: str = Field("5GB", description="Largest safetensors shard written (e.g. 500MB, 5GB).")
    allow_pickle: bool = Field(False, description="Allow loading .bin/.pt pickle weights (with torch.load(weights_only=True)).")
    trust_remote_code: bool = Field(False, description="Allow a source that needs its own model code.")

    @field_validator("max_shard_size")
    @classmethod
    def _valid_size(cls, value: str) -> str:
        parse_size(value)
        return value

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
        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as e:
            first = e.errors()[0]
            if first["type"] == "value_error":
                raise NetmorphError(str(first["msg"]).removeprefix("Value error, ")) from None
            raise _one_line(e, "invalid option") from None


TRAINING_KEYS = ("diff_attn_warmup_steps", "diff_attn_log_every", "diff_attn_num_monitor_layers")


class TrainingYaml(BaseModel):
    """The keys netmorph reads from an axolotl-style YAML; every other key is kept as it is."""

    model_config = ConfigDict(extra="allow")

    base_model: str
    output_dir: str | None = None
    diff_attention: bool | None = None
    diff_attn_warmup_steps: int | None = Field(None, ge=0)
    diff_attn_log_every: int | None = Field(None, gt=0)
    diff_attn_num_monitor_layers: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _no_unknown_diff_keys(self):
        unknown = sorted(k for k in (self.model_extra or {}) if k.startswith("diff_attn"))
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r}; known diff_attn keys: {', '.join(TRAINING_KEYS)}")
        return self

    @classmethod
    def from_yaml(cls, data: dict, path) -> "TrainingYaml":
        try:
            return cls(**data)
        except ValidationError as e:
            first = e.errors()[0]
            if first["type"] == "value_error":
                raise NetmorphError(f"{path}: {str(first['msg']).removeprefix('Value error, ')}") from None
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
