"""`netmorph probe`: measure what differential attention claims to improve, on any model netmorph loads.

Three probes (one module each): activation outliers (`outliers`), attention noise in multi-needle retrieval
(`retrieval`) and quantization robustness (`quantization`). `probe_model` runs them on one model; `probe` resolves one
or two models (original, converted, grown: model dirs, .gguf files or training YAMLs), runs them on the same tokens,
and returns a `ProbeReport` that prints as a table, saves as JSON and plots as a PNG.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from netmorph.errors import NetmorphError

PROBES = ("outliers", "retrieval", "quantization")


@dataclass
class ProbeSettings:
    """What the probes run on. Lengths are clipped to the models' context; lengths that cannot hold the needles,
    question and answer are refused."""

    texts: dict[str, str] = field(default_factory=dict)  # name → real text; default: the license texts
    probes: tuple[str, ...] = PROBES
    sequence_len: int = 256  # tokens per block for outliers and quantization
    max_blocks: int = 4
    lengths: tuple[int, ...] = (256, 512, 1024)  # retrieval context lengths (tokens)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    needles: int = 3
    digits: int = 6
    seed: int = 0
    weight_kinds: tuple[str, ...] = ("int8", "int4")
    activation_bits: tuple[int, ...] = (8, 6, 4)


@dataclass
class ModelProbes:
    """Every probe's result for one model: `outliers` a list of LayerOutliers (one per decoder layer), `retrieval` a
    RetrievalResult, `quantization` a QuantizationResult; None for a probe that was not run."""
    model: str
    differential: bool
    outliers: list | None = None
    retrieval: object | None = None
    quantization: object | None = None


@dataclass
class ProbeReport:
    """One `netmorph probe` run: its settings (texts, lengths, depths, needles, seed, ...) and one ModelProbes per
    model (the first, then `--compare`'s)."""
    settings: dict
    models: list[ModelProbes]

    def to_dict(self) -> dict:
        """The report as plain data (what `probe.json` holds; `report_from_dict` reads it back)."""
        return {"settings": self.settings, "models": [asdict(m) for m in self.models]}

    def to_json(self) -> str:
        """`to_dict()` as JSON text; NaN and ±Inf written as strings (JSON has no such numbers)."""
        return json.dumps(_finite(self.to_dict()), indent=2)

    def table(self) -> str:
        """The text tables the CLI prints (`report_table`)."""
        return report_table(self)


def report_from_dict(data: dict) -> ProbeReport:
    """The ProbeReport a `probe.json` holds (`ProbeReport.to_dict()`), e.g. to plot several runs' probes together."""
    from netmorph.probes.outliers import LayerOutliers, SiteStats
    from netmorph.probes.quantization import QuantizationResult, QuantizationRow
    from netmorph.probes.retrieval import RetrievalResult, TrialResult

    def number(value):
        return float(value) if isinstance(value, str) else value

    models = []
    for m in data["models"]:
        outliers = None if m["outliers"] is None else [
            LayerOutliers(o["layer"], *(SiteStats(**{k: number(v) if k != "top_channels" else v for k, v in o[site].items()})
                                        for site in ("residual", "attention"))) for o in m["outliers"]]
        retrieval = None
        if m["retrieval"] is not None:
            r = dict(m["retrieval"])
            r["trials"] = [TrialResult(**t) for t in r["trials"]]
            r["accuracy_by_length"] = {int(k): v for k, v in r["accuracy_by_length"].items()}
            r["accuracy_by_depth"] = {float(k): v for k, v in r["accuracy_by_depth"].items()}
            retrieval = RetrievalResult(**r)
        quantization = None
        if m["quantization"] is not None:
            q = dict(m["quantization"])
            q["rows"] = [QuantizationRow(**row) for row in q["rows"]]
            quantization = QuantizationResult(**q)
        models.append(ModelProbes(m["model"], m["differential"], outliers, retrieval, quantization))
    return ProbeReport(data["settings"], models)


def _finite(value):
    """JSON has no inf/NaN: they become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def probe_blocks(tokenizer, texts: dict[str, str], sequence_len: int, max_blocks: int):
    """(N, sequence_len) int64 token blocks of the texts (each followed by EOS), at most `max_blocks`."""
    from netmorph.train.data import pack

    return pack(tokenizer, list(texts.values()), sequence_len)[:max_blocks]


def probe_model(model, tokenizer, settings: ProbeSettings, name: str = "model") -> ModelProbes:
    """Run the selected probes on one fp32 model (any backend; the retrieval probe switches stock attention to eager
    and back, since it reads the attention probabilities)."""
    from netmorph.probes.outliers import activation_outliers
    from netmorph.probes.quantization import quantization_probe
    from netmorph.probes.retrieval import build_samples, retrieval_probe
    from netmorph.train.callbacks import diff_attention_modules

    result = ModelProbes(name, bool(diff_attention_modules(model)))
    blocks = probe_blocks(tokenizer, settings.texts, settings.sequence_len, settings.max_blocks)
    if "outliers" in settings.probes:
        result.outliers = activation_outliers(model, blocks)
    if "retrieval" in settings.probes:
        samples = build_samples(tokenizer, "\n".join(settings.texts.values()), list(settings.lengths),
                                list(settings.depths), settings.needles, settings.digits, settings.seed)
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:
            result.retrieval = retrieval_probe(model, samples)
        finally:
            model.set_attn_implementation(previous)
    if "quantization" in settings.probes:
        result.quantization = quantization_probe(model, blocks, settings.weight_kinds, settings.activation_bits)
    return result


def probe(model: str | None, compare: str | None = None, settings: ProbeSettings | None = None,
          trust_remote_code: bool = False) -> ProbeReport:
    """Resolve MODEL (and --compare), check they share a tokenizer, clip the lengths to their context, and probe
    each. Raises NetmorphError for bad input (unknown probe, lengths that fit nothing, different tokenizers)."""
    import netmorph.auto  # noqa: F401  (registers the differential-attention classes with the Auto classes)
    from netmorph.sources import default_texts
    from netmorph.train.run import _check_same_vocab, _evaluation_source
    from netmorph.verify.compare import context_length

    settings = settings or ProbeSettings()
    unknown = [p for p in settings.probes if p not in PROBES]
    if unknown:
        raise NetmorphError(f"unknown probe {unknown[0]!r}: choose from {', '.join(PROBES)}")
    if not settings.texts:
        settings.texts = default_texts()
    names = [model] + ([compare] if compare else [])
    sources = [_evaluation_source(n, trust_remote_code) if n else _bundled() for n in names]
    tokenizer = sources[0].load_tokenizer()
    if compare:
        _check_same_vocab(tokenizer, sources[1], model or "the bundled model", compare)
    for name, source in zip(names, sources):
        vocab = getattr(source.config, "vocab_size", None) or getattr(getattr(source.config, "text_config", None),
                                                                       "vocab_size", None)
        if vocab is not None and len(tokenizer) > vocab:
            raise NetmorphError(f"{name or 'the bundled model'} has {vocab} token embeddings but the tokenizer has "
                                f"{len(tokenizer)} tokens: pass a model whose tokenizer belongs to it")
    limit = context_length(*(s.config for s in sources))
    if limit is not None:
        fitting = tuple(n for n in settings.lengths if n <= limit)
        if "retrieval" in settings.probes and not fitting:
            raise NetmorphError(f"no retrieval length fits the model's context ({limit} tokens): pass --lengths "
                                f"at most {limit}")
        settings.lengths = fitting
        settings.sequence_len = min(settings.sequence_len, limit)
    results = []
    for label, source in zip(names, sources):
        try:
            results.append(probe_model(source.load_model("sdpa"), tokenizer, settings, label or "bundled SmolLM2"))
        except ValueError as e:  # a probe's own checks (lengths, missing torchao): one line
            raise NetmorphError(str(e)) from None
    recorded = {k: v for k, v in asdict(settings).items() if k != "texts"} | {"texts": list(settings.texts)}
    return ProbeReport(recorded, results)


def _bundled():
    from netmorph.sources import resolve_source

    return resolve_source(None)


def report_table(report: ProbeReport) -> str:
    """The probes of every model as text tables (one section per probe)."""
    lines = []
    models = report.models
    for m in models:
        if not m.outliers:
            continue
        lines.append(f"activation outliers of {m.model}: per layer max|x|/median|x| and excess kurtosis")
        lines.append(f"{'layer':>5} {'residual ratio':>15} {'kurtosis':>9} {'attn-out ratio':>15} {'kurtosis':>9}")
        for layer in m.outliers:
            r, a = layer.residual, layer.attention
            lines.append(f"{layer.layer:>5} {r.max_over_median:>15.1f} {r.kurtosis:>9.1f} {a.max_over_median:>15.1f} "
                         f"{a.kurtosis:>9.1f}")
        worst = max(m.outliers, key=lambda layer: layer.residual.max_abs)
        channels = ", ".join(f"{c['channel']} ({c['max_abs']:.1f})" for c in worst.residual.top_channels)
        lines.append(f"largest residual activation in layer {worst.layer}; its top channels (max|x|): {channels}")
        lines.append("")
    if any(m.retrieval for m in models):
        lines.append("multi-needle retrieval (accuracy; mean attention mass of the question on the answer span / on the "
                     "rest of the context, over layers)")
        for m in models:
            r = m.retrieval
            by_length = ", ".join(f"{n}: {a:.2f}" for n, a in r.accuracy_by_length.items())
            by_depth = ", ".join(f"{d:g}: {a:.2f}" for d, a in r.accuracy_by_depth.items())
            lines.append(f"{m.model}: accuracy {r.accuracy:.2f} (by length {by_length}; by depth {by_depth})")
            best = max(range(len(r.answer_mass)), key=lambda i: r.answer_mass[i])
            lines.append(f"  answer mass mean {sum(r.answer_mass) / len(r.answer_mass):.4f}, best layer {best} "
                         f"{r.answer_mass[best]:.4f}; noise mass mean {sum(r.noise_mass) / len(r.noise_mass):.4f}")
            if r.differential:
                c = r.components
                lines.append(f"  positive map: answer {_avg(c['positive_answer_mass']):.4f} noise "
                             f"{_avg(c['positive_noise_mass']):.4f}; negative map: answer "
                             f"{_avg(c['negative_answer_mass']):.4f} noise {_avg(c['negative_noise_mass']):.4f}")
    if any(m.quantization for m in models):
        lines.append("")
        lines.append(f"{'quantization (loss delta, nats/token)':<40}" + "".join(f" {Path(m.model).name[-18:]:>18}"
                                                                            for m in models))
        lines.append(f"{'unquantized loss':<40}" + "".join(f" {m.quantization.loss:>18.5f}" for m in models))
        for index, row in enumerate(models[0].quantization.rows):
            lines.append(f"{row.name:<40}" + "".join(f" {_delta(m.quantization.rows[index]):>18}" for m in models))
        partial = [(m, row) for m in models for row in m.quantization.rows if row.quantized_fraction < 1.0]
        for m, row in partial:
            skipped = f", {row.skipped_linears} skipped (input width not a multiple of 32)" if row.skipped_linears else ""
            lines.append(f"  {Path(m.model).name}: {row.name} quantized {row.quantized_fraction:.1%} of the decoder "
                         f"layers' weights ({row.quantized_linears} nn.Linear quantized{skipped}; weights outside "
                         "nn.Linear — MoE experts, GPT-2's Conv1D — are never quantized)")
    return "\n".join(lines)


def _delta(row) -> str:
    """A quantization row's loss delta for the table; "none quantized" when the row changed no weight."""
    return "none quantized" if row.quantized_fraction == 0 else f"{row.loss_delta:+.5f}"


def _avg(values: list[float]) -> float:
    return sum(values) / len(values)
