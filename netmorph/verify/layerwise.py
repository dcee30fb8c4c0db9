"""Layer-wise verification for checkpoints larger than RAM: one decoder layer of each model in memory at a time.

Each model is its own class (stock transformers or netmorph's) built on the meta device from its own config, so it
takes no memory, and runs its own forward — masks, positions, embedding scale, residual wiring are each family's
own code — while hooks load each decoder layer in fp32 from its safetensors tensors just before it runs and drop it
right after. The modules outside the layers (final norm, learned positions) stay loaded; of the embedding only the
rows of the text's tokens are read, and lm_head is applied a block of rows at a time. The texts run as one batch,
so each layer is read from disk once per model. Per layer, two figures:

- same input: both layers fed the ORIGINAL model's hidden states, so a difference does not compound; this is the
  layer's own error, and the original's output is what both models get at the next layer;
- own path: the converted model fed its own previous output, i.e. what the whole converted model computes.

At the end, the final norm + lm_head of each model on its own path give the end-to-end logits, compared as the
full `verify` compares them (max/mean |Δlogit|, KL, loss) — the same numbers, up to float rounding, without ever
holding a whole model. Greedy generation needs every layer per token, so this mode checks teacher-forced top-1
agreement at every position instead.
"""

import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from netmorph.errors import NetmorphError
from netmorph.io.reader import SafetensorsReader, TensorReader
from netmorph.io.streaming import release_freed_memory
from netmorph.verify.compare import TOKENIZER_LINES, TextComparison, clip_to_context, compare_logits, context_length

log = logging.getLogger("netmorph")

# Full verification holds the original and the converted model in fp32 at once; above this share of the memory
# available now, the converters verify layer by layer instead.
FULL_VERIFY_MEMORY_SHARE = 0.5


def whole_models_fit(original: TensorReader, converted_elements: int | None = None) -> bool:
    """Whether fp32 copies of both models fit in FULL_VERIFY_MEMORY_SHARE of the memory available now; the converted
    model's element count defaults to the original's (a relayout)."""
    import psutil

    original_elements = sum(original.describe(name).numel for name in original.keys())
    needed = 4 * (original_elements + (original_elements if converted_elements is None else converted_elements))
    return needed <= FULL_VERIFY_MEMORY_SHARE * psutil.virtual_memory().available


# Rows of the output embedding multiplied at once: bounds the fp32 copy of lm_head (vocab × hidden).
LM_HEAD_ROWS_PER_CHUNK = 8192


@dataclass
class LayerComparison:
    """One row of the layer-wise table: max |Δ| of the hidden states when both layers get the original's input
    (`same_input`) and on the converted model's own path (`own_path`)."""

    layer: str
    same_input_max_abs_diff: float
    own_path_max_abs_diff: float


@dataclass
class LayerwiseReport:
    """The layer-wise verification of a checkpoint: per-layer hidden-state differences, per-text logit figures and
    teacher-forced top-1 agreement (fraction of positions), the tolerance on max |Δlogit| and the tokenizer check."""

    tolerance: float
    attn_implementation: str
    layers: list[LayerComparison] = field(default_factory=list)
    texts: list[TextComparison] = field(default_factory=list)
    top1_agreement: list[float] = field(default_factory=list)
    tokenizer_match: bool | None = None  # as VerifyReport.tokenizer_match
    dtype: str = "float32"  # the precision both models run in

    @property
    def max_abs_logit_diff(self) -> float:
        """The largest max |Δlogit| over the texts (ValueError when there are none)."""
        return max(t.max_abs_logit_diff for t in self.texts)

    @property
    def max_layer_diff(self) -> float:
        """The largest same-input hidden-state difference over the rows (ValueError when there are none)."""
        return max(layer.same_input_max_abs_diff for layer in self.layers)

    @property
    def top1_match(self) -> bool:
        """Whether the top-1 tokens agree at every position of every text."""
        return all(agreement == 1.0 for agreement in self.top1_agreement)

    @property
    def passed(self) -> bool:
        """max |Δlogit| ≤ tolerance (NaN fails), every top-1 token agreeing, and no failed tokenizer check."""
        return self.max_abs_logit_diff <= self.tolerance and self.top1_match and self.tokenizer_match is not False

    def to_dict(self) -> dict:
        """The report as plain data, with the derived figures (perplexities, maxima, pass) and mode "layerwise"."""
        data = asdict(self)
        for text, entry in zip(self.texts, data["texts"]):
            entry["perplexity_original"] = text.perplexity_original
            entry["perplexity_converted"] = text.perplexity_converted
        data.update(mode="layerwise", max_abs_logit_diff=self.max_abs_logit_diff, max_layer_diff=self.max_layer_diff,
                    top1_match=self.top1_match, passed=self.passed)
        return data

    def to_json(self) -> str:
        """`to_dict` as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """The report as the text table the CLI prints and the model card embeds."""
        lines = [
            f"layer-wise   attention: {self.attn_implementation}   tolerance: max |Δlogit| ≤ {self.tolerance:g} ({self.dtype})",
            f"{'layer':<16}{'max|Δ| same input':>19}{'max|Δ| own path':>17}",
        ]
        lines += [f"{c.layer:<16}{c.same_input_max_abs_diff:>19.3e}{c.own_path_max_abs_diff:>17.3e}" for c in self.layers]
        lines.append(
            f"{'text':<14}{'tokens':>7}{'max|Δlogit|':>13}{'mean|Δlogit|':>14}{'mean KL':>11}"
            f"{'loss orig':>11}{'loss conv':>11}{'top-1 agree':>13}"
        )
        for t, agreement in zip(self.texts, self.top1_agreement):
            lines.append(
                f"{t.name[:13]:<14}{t.tokens:>7}{t.max_abs_logit_diff:>13.3e}{t.mean_abs_logit_diff:>14.3e}"
                f"{t.mean_kl:>11.3e}{t.loss_original:>11.5f}{t.loss_converted:>11.5f}{agreement:>13.2%}"
            )
        if self.tokenizer_match is not None:
            lines.append(TOKENIZER_LINES[self.tokenizer_match])
        lines.append(
            ("Top-1 tokens match!" if self.top1_match else "Top-1 tokens differ.")
            + f"  max |Δlogit| = {self.max_abs_logit_diff:.3e} → {'PASS' if self.passed else 'FAIL'}"
        )
        return "\n".join(lines)


class LayerByLayer:
    """One checkpoint as its own (stock or netmorph) model class, parameters on the meta device. `run` calls the
    model's own forward — so each family's masks, positions, embedding scale and residual wiring are its own code —
    while hooks load each decoder layer (fp32) just before it runs and drop it right after."""

    def __init__(self, path: str | Path, attn_implementation: str, trust_remote_code: bool):
        from transformers import AutoModelForCausalLM

        import netmorph.auto  # noqa: F401  (registers the differential-attention classes with the Auto classes)
        from netmorph.sources import resolve_source

        self.source = resolve_source(path, trust_remote_code=trust_remote_code)
        if self.source.kind != "hf":
            raise NetmorphError(
                f"layer-wise verification reads safetensors model directories, and {path} is a GGUF file: "
                "drop --layerwise (a GGUF model fits in memory) or convert it to a model directory"
            )
        self.reader = self.source.reader()
        if not isinstance(self.reader, SafetensorsReader):
            raise NetmorphError(f"layer-wise verification needs safetensors weights in {path}")
        self.config = self.source.config
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(
                self.config, dtype=torch.float32, attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
            )
        self.model.eval()
        self._names = {id(module): name for name, module in self.model.named_modules()}
        self.layers = _decoder_layers(self.model, self.config.num_hidden_layers)
        self.final_norm = _final_norm(self.model.base_model)
        self._compute_non_persistent_buffers()
        self._load_resident()

    def _compute_non_persistent_buffers(self) -> None:
        """Rotary frequencies, embedding scales, …: computed at construction, never stored. As transformers'
        own loading does, they get real memory and the model's `_init_weights` fills them."""
        owners = {}
        for name, buffer in self.model.named_buffers():
            owner_name, _, key = name.rpartition(".")
            owner = self.model.get_submodule(owner_name)
            if key in owner._non_persistent_buffers_set:
                owner._buffers[key] = torch.empty(buffer.shape, dtype=buffer.dtype)
                owners[id(owner)] = owner
        for owner in owners.values():
            self.model._init_weights(owner)

    def _load_resident(self) -> None:
        """Everything outside the decoder layers and the two vocabulary matrices: final norm, learned positions."""
        vocabulary = (self.model.get_input_embeddings(), self.model.get_output_embeddings())
        skip = tuple(self.tensor_name(module, "") for module in (*self.layers, *vocabulary))
        state = {key: self.read(key).to(torch.float32) for key in self.model.state_dict()
                 if not key.startswith(skip)}
        self.model.load_state_dict(state, strict=False, assign=True)

    def tensor_name(self, module: nn.Module, key: str) -> str:
        """The stored name of `module`'s parameter or buffer `key` (its path in the model, then the key)."""
        return f"{self._names[id(module)]}.{key}"

    def read(self, name: str) -> torch.Tensor:
        """The stored tensor `name` (the output embedding falls back to the family's stored head name or to the tied
        input embedding), checked to be finite. Raises NetmorphError when the checkpoint lacks it or it holds
        NaN/Inf."""
        if name not in self.reader and name == self.tensor_name(self.model.get_output_embeddings(), "weight"):
            name = self._stored_lm_head()
        if name not in self.reader:
            raise NetmorphError(f"{self.source.path} has no tensor {name}: the checkpoint is incomplete")
        return self.reader.get(name)

    def _stored_lm_head(self) -> str:
        """The output embedding's tensor when it is not stored under its module's name: the family's stock name
        (GPT-NeoX's module `lm_head` is saved as `embed_out`), or the input embedding when the two are tied."""
        from netmorph.arch import FAMILIES

        family = FAMILIES.get(getattr(self.config, "source_family", None) or self.config.model_type)
        if family is not None and family.lm_head in self.reader:
            return family.lm_head
        return self.tensor_name(self.model.get_input_embeddings(), "weight")

    def materialize(self, module: nn.Module) -> nn.Module:
        """Load the module's parameters and persistent buffers from the checkpoint, in fp32, one tensor at a time."""
        state = {key: self.read(self.tensor_name(module, key)).to(torch.float32) for key in module.state_dict()}
        module.load_state_dict(state, assign=True, strict=True)
        return module

    @staticmethod
    def release(module: nn.Module) -> None:
        """Move `module`'s tensors to the meta device and hand the freed memory back to the OS."""
        module.to("meta")
        release_freed_memory()

    @torch.no_grad()
    def run(self, ids: torch.Tensor, attention_mask: torch.Tensor | None, on_layer) -> torch.Tensor:
        """The model's forward on `ids` (B, T) up to its final norm → (B, T, D). Only the embedding rows of these
        tokens are loaded: the ids are renumbered into a compact embedding table. `on_layer(index, layer, args,
        kwargs, output)` sees each decoder layer's call while the layer is loaded."""
        embedding = self.model.get_input_embeddings()
        used, compact_ids = torch.unique(ids, return_inverse=True)
        rows = self.read(self.tensor_name(embedding, "weight"))[used].to(torch.float32)  # (used tokens, D)
        embedding.weight = nn.Parameter(rows, requires_grad=False)  # the whole (vocab, D) table is not kept
        release_freed_memory()
        hooks = []
        for index, layer in enumerate(self.layers):
            hooks.append(layer.register_forward_pre_hook(self._before_layer))
            hooks.append(layer.register_forward_hook(
                lambda module, args, kwargs, output, index=index: self._after_layer(index, module, args, kwargs,
                                                                                     output, on_layer),
                with_kwargs=True))
        try:
            out = self.model.base_model(input_ids=compact_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
            self.release(embedding)
        return out.last_hidden_state

    def _before_layer(self, module, args) -> None:
        self.materialize(module)

    def _after_layer(self, index, module, args, kwargs, output, on_layer):
        on_layer(index, module, args, kwargs, _hidden(output))
        self.release(module)

    @torch.no_grad()
    def lm_head(self, normed: torch.Tensor) -> torch.Tensor:
        """(T, D) → fp32 logits (T, vocab), converting the (vocab, D) weight to fp32 a block of rows at a time
        (and Gemma 2/3's final logit soft-capping, Granite's logits_scaling)."""
        weight = self.read(self.tensor_name(self.model.get_output_embeddings(), "weight"))
        logits = torch.empty(normed.shape[0], weight.shape[0])
        for start in range(0, weight.shape[0], LM_HEAD_ROWS_PER_CHUNK):
            rows = weight[start : start + LM_HEAD_ROWS_PER_CHUNK].float()
            torch.matmul(normed, rows.T, out=logits[:, start : start + rows.shape[0]])
        bias_name = self.tensor_name(self.model.get_output_embeddings(), "bias")
        if bias_name in self.reader:
            logits += self.reader.get(bias_name).float()
        if (cap := getattr(self.config, "final_logit_softcapping", None)) is not None:
            logits = torch.tanh(logits / cap) * cap
        if (scaling := getattr(self.config, "logits_scaling", None)) is not None:  # Granite divides the logits
            logits = logits / scaling
        return logits


def _decoder_layers(model: nn.Module, depth: int) -> list[nn.Module]:
    """The decoder layer list: the outermost ModuleList of `num_hidden_layers` entries (model.layers,
    gpt_neox.layers, transformer.h, …; StableLM's per-head norm lists lie deeper)."""
    candidates = [(name.count("."), name) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) == depth]
    if not candidates:
        raise NetmorphError(f"found no list of {depth} decoder layers in {type(model).__name__}: "
                            "use full verification (--verify-mode full / drop --layerwise)")
    return list(model.get_submodule(min(candidates)[1]))


def _final_norm(base: nn.Module) -> nn.Module | None:
    for name in ("norm", "final_layer_norm", "ln_f"):
        if isinstance(module := getattr(base, name, None), nn.Module):
            return module
    return None


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _Spill:
    """Tensors kept in an unlinked temporary file and read back on demand: the original model's output of every
    layer, which in memory would take depth × texts × tokens × hidden × 4 bytes (2.7 GB for a 70B model)."""

    def __init__(self):
        self._file = tempfile.TemporaryFile()
        self._where: dict[int, tuple[int, torch.Size, torch.dtype]] = {}

    def __setitem__(self, key: int, tensor: torch.Tensor) -> None:
        self._file.seek(0, os.SEEK_END)
        self._where[key] = (self._file.tell(), tensor.shape, tensor.dtype)
        self._file.write(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())

    def __getitem__(self, key: int) -> torch.Tensor:
        offset, shape, dtype = self._where[key]
        self._file.seek(offset)
        data = bytearray(self._file.read(math.prod(shape) * dtype.itemsize))
        return torch.frombuffer(data, dtype=dtype).view(shape)


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """A layer's call arguments with its hidden-state input replaced (first positional, or `hidden_states=`)."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> float:
    return (a - b)[valid].abs().max().item()


def _batch(ids: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Texts as one right-padded batch (padding after a causal sequence changes none of its positions):
    ids (B, T), the attention mask (None when no text is padded) and the valid positions (B, T)."""
    length = max(x.shape[1] for x in ids)
    batch = torch.full((len(ids), length), pad_id, dtype=torch.long)
    valid = torch.zeros(len(ids), length, dtype=torch.bool)
    for row, x in enumerate(ids):
        batch[row, : x.shape[1]], valid[row, : x.shape[1]] = x[0], True
    return batch, (None if bool(valid.all()) else valid.long()), valid


@torch.no_grad()
def compare_layerwise(
    original: str | Path,
    converted: str | Path,
    texts: dict[str, str],
    max_tokens: int = 512,
    tolerance: float = 1e-4,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    progress: bool = False,
) -> LayerwiseReport:
    """Compare two checkpoints of the same depth layer by layer on real text (see the module docstring)."""
    models = [LayerByLayer(path, attn_implementation, trust_remote_code) for path in (original, converted)]
    model_a, model_b = models
    if len(model_a.layers) != len(model_b.layers):
        raise NetmorphError(
            f"{original} has {len(model_a.layers)} decoder layers and {converted} {len(model_b.layers)}: "
            "layer-wise verification compares models of the same depth"
        )
    widths = [model.config.hidden_size for model in models]
    if widths[0] != widths[1]:
        raise NetmorphError(
            f"{original} has hidden size {widths[0]} and {converted} {widths[1]}: layer-wise verification feeds one "
            "model's hidden states to the other's layers, so it needs equal widths; verify the whole models instead "
            "(drop --layerwise)"
        )
    tokenizer = _tokenizer(models)
    max_tokens = clip_to_context(max_tokens, context_length(model_a.config, model_b.config), "verification texts")
    ids = [tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens] for text in texts.values()]
    batch, attention_mask, valid = _batch(ids)
    report = LayerwiseReport(tolerance=tolerance, attn_implementation=attn_implementation)
    bar = _progress(2 * len(model_a.layers), progress)

    # The original, with every layer's output kept on disk: the "same input" of the converted model's next layer.
    outputs_a = _Spill()

    def record(index, layer, args, kwargs, output):
        """on_layer of the original model: keeps each layer's output (and layer 0's input, the embedding) in the
        spill file."""
        if index == 0:
            outputs_a[-1] = _layer_input(args, kwargs)  # the embedding (scaled, positions added: the model's own)
        outputs_a[index] = output
        if bar is not None:
            bar.update(1)

    final_a = model_a.run(batch, attention_mask, record)

    # The converted model on its own path, each layer also run on the original's input to the same layer.
    figures = {}

    def compare(index, layer, args, kwargs, output):
        """on_layer of the converted model: reruns the layer on the original's input to it and records both
        differences (same input, own path) at the valid positions."""
        if index == 0:
            embedding = _max_abs_diff(outputs_a[-1], _layer_input(args, kwargs), valid)
            report.layers.append(LayerComparison("embedding", embedding, embedding))
        same_args, same_kwargs = _with_hidden(args, kwargs, outputs_a[index - 1])
        same = _hidden(layer.forward(*same_args, **same_kwargs))  # .forward: no hooks, the layer stays loaded
        expected = outputs_a[index]
        figures[index] = (_max_abs_diff(expected, same, valid), _max_abs_diff(expected, output, valid))
        if bar is not None:
            bar.update(1)

    final_b = model_b.run(batch, attention_mask, compare)
    report.layers += [LayerComparison(f"layer {index}", *figures[index]) for index in sorted(figures)]
    if bar is not None:
        bar.close()

    head_same_input = 0.0
    norm_b = model_b.final_norm  # loaded with the other resident modules
    if norm_b is not None:  # the converted model's final norm + lm_head on the original's last hidden states
        final_b_same = norm_b(outputs_a[len(model_a.layers) - 1])
    # One text's logits at a time: (T, vocab) in fp32 is large for a big vocabulary.
    for row, (name, x) in enumerate(zip(texts, ids)):
        positions = valid[row]
        logits_a = model_a.lm_head(final_a[row, positions])
        if norm_b is not None:
            head_same_input = max(head_same_input,
                                  (logits_a - model_b.lm_head(final_b_same[row, positions])).abs().max().item())
        logits_b = model_b.lm_head(final_b[row, positions])
        report.texts.append(compare_logits(logits_a, logits_b, x, name))
        report.top1_agreement.append((logits_a.argmax(-1) == logits_b.argmax(-1)).float().mean().item())
        del logits_a, logits_b
    report.layers.append(LayerComparison("norm + lm_head", head_same_input, report.max_abs_logit_diff))
    return report


def _tokenizer(models: list[LayerByLayer]):
    for model in models:
        try:
            return model.source.load_tokenizer()
        except (ValueError, OSError, NetmorphError):
            continue
    raise NetmorphError("neither model directory has a tokenizer: copy the tokenizer files into one of them")


def _progress(total: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="layer", desc="verifying", file=sys.stderr, dynamic_ncols=True)
