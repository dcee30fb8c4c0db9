"""Layer-wise verification for checkpoints larger than RAM: one decoder layer of each model in memory at a time.

Each model is built on the meta device (its class, from its own config: no memory), and one module at a time is
materialized in fp32 from its safetensors tensors, run, and dropped again. Both models get the same hidden states,
the embedding of real text by the original model. Per layer, two figures:

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
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from netmorph.errors import NetmorphError
from netmorph.io.reader import SafetensorsReader
from netmorph.io.streaming import release_freed_memory
from netmorph.verify import TextComparison, compare_logits

log = logging.getLogger("netmorph")

# Rows of the output embedding multiplied at once: bounds the fp32 copy of lm_head (vocab × hidden).
LM_HEAD_ROWS_PER_CHUNK = 8192


@dataclass
class LayerComparison:
    layer: str
    same_input_max_abs_diff: float
    own_path_max_abs_diff: float


@dataclass
class LayerwiseReport:
    tolerance: float
    attn_implementation: str
    layers: list[LayerComparison] = field(default_factory=list)
    texts: list[TextComparison] = field(default_factory=list)
    top1_agreement: list[float] = field(default_factory=list)

    @property
    def max_abs_logit_diff(self) -> float:
        return max(t.max_abs_logit_diff for t in self.texts)

    @property
    def max_layer_diff(self) -> float:
        return max(layer.same_input_max_abs_diff for layer in self.layers)

    @property
    def top1_match(self) -> bool:
        return all(agreement == 1.0 for agreement in self.top1_agreement)

    @property
    def passed(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance and self.top1_match

    def to_dict(self) -> dict:
        data = asdict(self)
        for text, entry in zip(self.texts, data["texts"]):
            entry["perplexity_original"] = text.perplexity_original
            entry["perplexity_converted"] = text.perplexity_converted
        data.update(mode="layerwise", max_abs_logit_diff=self.max_abs_logit_diff, max_layer_diff=self.max_layer_diff,
                    top1_match=self.top1_match, passed=self.passed)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        lines = [
            f"layer-wise   attention: {self.attn_implementation}   tolerance: max |Δlogit| ≤ {self.tolerance:g} (fp32)",
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
        lines.append(
            ("Top-1 tokens match!" if self.top1_match else "Top-1 tokens differ.")
            + f"  max |Δlogit| = {self.max_abs_logit_diff:.3e} → {'PASS' if self.passed else 'FAIL'}"
        )
        return "\n".join(lines)


class LayerByLayer:
    """One checkpoint as its own model class on the meta device; `materialize` loads one module's tensors (fp32)."""

    def __init__(self, path: str | Path, attn_implementation: str, trust_remote_code: bool):
        from transformers import AutoModelForCausalLM

        import netmorph  # noqa: F401  (registers the differential-attention classes with the Auto classes)
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
        base = self.model.base_model
        self.layers = list(base.layers)
        self.final_norm = base.norm
        self._names = {id(module): name for name, module in self.model.named_modules()}
        with torch.device("cpu"):  # rotary frequencies are computed, not stored: build them for real
            self.rotary = type(base.rotary_emb)(config=self.config)

    def tensor_name(self, module: nn.Module, key: str) -> str:
        return f"{self._names[id(module)]}.{key}"

    def read(self, name: str) -> torch.Tensor:
        tied = getattr(self.config, "tie_word_embeddings", False)
        if tied and name not in self.reader and name == self.tensor_name(self.model.get_output_embeddings(), "weight"):
            name = self.tensor_name(self.model.get_input_embeddings(), "weight")
        if name not in self.reader:
            raise NetmorphError(f"{self.source.path} has no tensor {name}: the checkpoint is incomplete")
        return self.reader.get(name)

    def materialize(self, module: nn.Module) -> nn.Module:
        """Load the module's parameters and persistent buffers from the checkpoint, in fp32, one tensor at a time."""
        state = {key: self.read(self.tensor_name(module, key)).to(torch.float32) for key in module.state_dict()}
        module.load_state_dict(state, assign=True, strict=True)
        return module

    @staticmethod
    def release(module: nn.Module) -> None:
        module.to("meta")
        release_freed_memory()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.read(self.tensor_name(self.model.get_input_embeddings(), "weight"))
        return weight[ids].to(torch.float32)  # (1, T, D): only the rows of these tokens stay in memory

    def layer_masks(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> list:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kwargs = {"config": self.config, "inputs_embeds": hidden, "attention_mask": None, "past_key_values": None,
                  "position_ids": position_ids}
        masks = {"full_attention": create_causal_mask(**kwargs)}
        types = _layer_types(self.config)
        if "sliding_attention" in types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return [masks[kind] for kind in types]

    @torch.no_grad()
    def final_norm_of(self, hidden_states: list[torch.Tensor]) -> list[torch.Tensor]:
        norm = self.materialize(self.final_norm)
        normed = [norm(hidden)[0] for hidden in hidden_states]  # (T, D) per text
        self.release(norm)
        return normed

    @torch.no_grad()
    def lm_head(self, normed: torch.Tensor) -> torch.Tensor:
        """(T, D) → fp32 logits (T, vocab), converting the (vocab, D) weight to fp32 a block of rows at a time."""
        weight = self.read(self.tensor_name(self.model.get_output_embeddings(), "weight"))
        logits = torch.empty(normed.shape[0], weight.shape[0])
        for start in range(0, weight.shape[0], LM_HEAD_ROWS_PER_CHUNK):
            rows = weight[start : start + LM_HEAD_ROWS_PER_CHUNK].float()
            torch.matmul(normed, rows.T, out=logits[:, start : start + rows.shape[0]])
        bias_name = self.tensor_name(self.model.get_output_embeddings(), "bias")
        return logits + self.reader.get(bias_name).float() if bias_name in self.reader else logits


def _layer_types(config) -> list[str]:
    from netmorph.arch import FAMILIES

    if config.model_type in FAMILIES:
        return FAMILIES[config.model_type].layer_types(config)
    return list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)


def _run_layer(layer: nn.Module, hidden: torch.Tensor, mask, position_embeddings, position_ids) -> torch.Tensor:
    out = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings, position_ids=position_ids,
                past_key_values=None, use_cache=False)
    return out[0] if isinstance(out, tuple) else out


def _max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


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
    tokenizer = _tokenizer(models)
    ids = [tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens] for text in texts.values()]
    report = LayerwiseReport(tolerance=tolerance, attn_implementation=attn_implementation)

    hidden_a = [model_a.embed(x) for x in ids]  # the original's path (also the "same input" of every layer)
    hidden_b = [model_b.embed(x) for x in ids]  # the converted model's own path
    embedding_diff = _max_abs_diff(hidden_a, hidden_b)
    report.layers.append(LayerComparison("embedding", embedding_diff, embedding_diff))
    positions = [torch.arange(x.shape[1])[None] for x in ids]
    rotary = [[m.rotary(h, position_ids=p) for h, p in zip(hidden_a, positions)] for m in models]
    masks = [[m.layer_masks(h, p) for h, p in zip(hidden_a, positions)] for m in models]

    bar = _progress(len(model_a.layers), progress)
    for index, (layer_a, layer_b) in enumerate(zip(model_a.layers, model_b.layers)):
        layer = model_a.materialize(layer_a)
        out_a = [_run_layer(layer, h, m[index], r, p) for h, m, r, p in zip(hidden_a, masks[0], rotary[0], positions)]
        model_a.release(layer)
        layer = model_b.materialize(layer_b)
        same = [_run_layer(layer, h, m[index], r, p) for h, m, r, p in zip(hidden_a, masks[1], rotary[1], positions)]
        own = [_run_layer(layer, h, m[index], r, p) for h, m, r, p in zip(hidden_b, masks[1], rotary[1], positions)]
        model_b.release(layer)
        report.layers.append(LayerComparison(f"layer {index}", _max_abs_diff(out_a, same), _max_abs_diff(out_a, own)))
        log.debug("layer %d: max |Δ| same input %.3e, own path %.3e", index,
                  report.layers[-1].same_input_max_abs_diff, report.layers[-1].own_path_max_abs_diff)
        hidden_a, hidden_b = out_a, own
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    # One text's logits at a time: (T, vocab) in fp32 is large for a big vocabulary.
    head_same_input = 0.0
    finals = zip(model_a.final_norm_of(hidden_a), model_b.final_norm_of(hidden_a), model_b.final_norm_of(hidden_b))
    for name, x, (final_a, final_b_same, final_b) in zip(texts, ids, finals):
        logits_a = model_a.lm_head(final_a)
        head_same_input = max(head_same_input, (logits_a - model_b.lm_head(final_b_same)).abs().max().item())
        logits_b = model_b.lm_head(final_b)
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
