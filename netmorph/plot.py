"""`netmorph plot`: PNG figures of training runs (loss, λ, attention statistics) and of attention maps.

Figures have a fixed size in pixels (`size` × `DPI`) so they can be compared and embedded without surprises.
"""

import json
from pathlib import Path

import torch

from netmorph.errors import NetmorphError
from netmorph.verify.compare import clip_to_context, context_length

DPI = 100


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise NetmorphError("plotting needs matplotlib: pip install 'netmorph[train]'") from None

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def read_log_history(run_dir: str | Path) -> list[dict]:
    """The Trainer's log history of a run: `trainer_state.json` in the run directory or its newest checkpoint."""
    run_dir = Path(run_dir).expanduser()
    candidates = [run_dir / "trainer_state.json"]
    candidates += sorted(run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1]))[::-1]
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text())["log_history"]
    raise NetmorphError(f"no trainer_state.json in {run_dir} or its checkpoints: pass the output_dir of `netmorph train`")


def series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in a Trainer log history: the entries that hold a number under it, in log order."""
    points = [(entry["step"], entry[key]) for entry in history if isinstance(entry.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def plot_training(run_dirs: list[str | Path], output: str | Path, size: tuple[float, float] = (15, 4.5)) -> Path:
    """Loss of every run (train and eval) and, for differential-attention runs, λ and the mix and the attention
    entropies of the monitored layers, side by side; written as a PNG of size × DPI pixels."""
    return _save(training_figure(run_dirs, size), output)


def training_figure(run_dirs: list[str | Path], size: tuple[float, float] = (15, 4.5)):
    """The matplotlib figure of `plot_training` (three axes: loss, λ and mix, entropy)."""
    plt = _pyplot()
    histories = {Path(d).name or str(d): read_log_history(d) for d in run_dirs}
    figure, (loss_axis, lambda_axis, entropy_axis) = plt.subplots(1, 3, figsize=size, dpi=DPI)
    for name, history in histories.items():
        for key, style in (("loss", "-"), ("eval_loss", "o--")):
            steps, values = series(history, key)
            if steps:
                loss_axis.plot(steps, values, style, label=f"{name} {key.replace('_', ' ')}")
        for key in sorted({k for entry in history for k in entry if k.startswith("diff_attn/")}):
            steps, values = series(history, key)
            short = key.removeprefix("diff_attn/")
            if key in ("diff_attn/mix", "diff_attn/lambda_full_mean") or key.endswith(("/lambda_full", "/lambda_mean")):
                lambda_axis.plot(steps, values, label=f"{name} {short}")
            elif key.endswith("_entropy"):
                entropy_axis.plot(steps, values, label=f"{name} {short}")
    _finish(loss_axis, "loss", "step", "loss")
    _finish(lambda_axis, "λ_full and mix", "step", "value")
    _finish(entropy_axis, "attention entropy (nats)", "step", "entropy")
    return figure


def _finish(axis, title: str, xlabel: str, ylabel: str) -> None:
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    if axis.has_data():
        axis.legend(fontsize="x-small")
    else:
        axis.text(0.5, 0.5, "no data in the logs", ha="center", va="center", transform=axis.transAxes)


def _save(figure, output: str | Path) -> Path:
    output = Path(output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=DPI, format="png")
    _pyplot().close(figure)
    return output


@torch.no_grad()
def attention_maps(model, input_ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]:
    """Positive and negative softmax maps (heads, T, T) of one differential-attention layer for one sequence,
    from the layer's real input during a forward pass, and the λ the layer applies."""
    from netmorph.train.callbacks import attention_input, diff_attention_modules, token_lambda

    modules = diff_attention_modules(model)
    if not modules:
        raise NetmorphError("the model has no differential attention: convert it with `netmorph convert-diff-transformer`")
    if not 0 <= layer < len(modules):
        raise NetmorphError(f"--layer {layer} is out of range: the model has layers 0..{len(modules) - 1}")
    module, captured = modules[layer], {}

    def hook(mod, args, kwargs):
        """Forward pre-hook: captures both softmax maps and the λ of the first sequence from the layer's real input."""
        hidden, position_embeddings = attention_input(args, kwargs)
        captured["maps"] = mod.branch_probabilities(hidden[:1], position_embeddings)
        captured["lambda"] = token_lambda(mod, hidden[:1])

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids[:1], use_cache=False)
    finally:
        handle.remove()
    positive, negative = captured["maps"]
    lam = captured["lambda"]  # a float, or DIFF V2's per-token (1, heads, T, 1)
    return positive[0], negative[0], lam[0] if isinstance(lam, torch.Tensor) else lam


def _describe(lam) -> str:
    return f"{lam:.3f}" if isinstance(lam, float) else f"per token, mean {lam.mean().item():.3f}"


def plot_attention(model, tokenizer, prompt: str, layer: int, head: int | None, output: str | Path,
                   size: tuple[float, float] = (15, 5)) -> Path:
    """The paper's picture: positive, negative and differential (pos − λ·neg) attention of one layer for a prompt,
    for one head or averaged over heads; written as a PNG of size × DPI pixels."""
    return _save(attention_figure(model, tokenizer, prompt, layer, head, size), output)


def attention_figure(model, tokenizer, prompt: str, layer: int, head: int | None,
                     size: tuple[float, float] = (15, 5)):
    """The matplotlib figure of `plot_attention`: three axes, each one image of a (T, T) map (keys → columns,
    queries ↓ rows), in the order positive, negative, differential."""
    plt = _pyplot()
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    input_ids = input_ids[:, :clip_to_context(input_ids.shape[1], context_length(model.config), "the prompt")]
    positive, negative, lam = attention_maps(model, input_ids, layer)
    if head is not None and not 0 <= head < positive.shape[0]:
        raise NetmorphError(f"--head {head} is out of range: layer {layer} has heads 0..{positive.shape[0] - 1}")
    pick = (lambda maps: maps[head]) if head is not None else (lambda maps: maps.mean(0))
    panels = {"positive softmax": pick(positive), "negative softmax": pick(negative),
              f"differential: pos − λ·neg (λ = {_describe(lam)})": pick(positive - lam * negative)}
    tokens = [tokenizer.decode([t]) for t in input_ids[0].tolist()]
    figure, axes = plt.subplots(1, 3, figsize=size, dpi=DPI)
    causal = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
    for axis, (title, values) in zip(axes, panels.items()):
        # Colours clipped at the 99th percentile of the causal region: attention sinks would hide everything else.
        top = values[causal].abs().quantile(0.99).item() or 1.0
        if "differential" in title:
            image = axis.imshow(values.numpy(), cmap="RdBu_r", vmin=-top, vmax=top)  # white = 0, blue = cancelled
        else:
            image = axis.imshow(values.numpy(), cmap="viridis", vmin=0, vmax=top)
        axis.set_title(title, fontsize="small")
        figure.colorbar(image, ax=axis, fraction=0.046)
        if len(tokens) <= 32:
            axis.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
            axis.set_yticks(range(len(tokens)), tokens, fontsize=6)
    which = f"head {head}" if head is not None else "mean over heads"
    figure.suptitle(f"layer {layer}, {which}: keys → (columns), queries ↓ (rows)")
    return figure


def plot_probes(report, output: str | Path, size: tuple[float, float] = (14, 9)) -> Path:
    """The probes of `netmorph probe` as one PNG of size × DPI pixels (`report`: a netmorph.probes.ProbeReport)."""
    return _save(probes_figure(report, size), output)


def probes_figure(report, size: tuple[float, float] = (14, 9)):
    """Four axes: outlier ratio per layer, kurtosis per layer, attention mass on the answer span per layer
    (differential models also their positive and negative maps), loss delta per quantization."""
    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=size, dpi=DPI)
    (ratio_axis, kurtosis_axis), (mass_axis, quant_axis) = axes
    for m in report.models:
        name = Path(m.model).name or m.model
        if m.outliers:
            layers = [o.layer for o in m.outliers]
            line, = ratio_axis.plot(layers, [o.residual.max_over_median for o in m.outliers], "-", label=f"{name} residual")
            ratio_axis.plot(layers, [o.attention.max_over_median for o in m.outliers], "--", color=line.get_color(),
                            label=f"{name} attention out")
            kurtosis_axis.plot(layers, [o.residual.kurtosis for o in m.outliers], "-", color=line.get_color(),
                               label=f"{name} residual")
            kurtosis_axis.plot(layers, [o.attention.kurtosis for o in m.outliers], "--", color=line.get_color(),
                               label=f"{name} attention out")
        if m.retrieval:
            r = m.retrieval
            line, = mass_axis.plot(range(len(r.answer_mass)), r.answer_mass, "-",
                                   label=f"{name} (acc {r.accuracy:.2f})" + (" differential" if r.differential else ""))
            if r.differential:
                mass_axis.plot(r.components["positive_answer_mass"], ":", color=line.get_color(), label=f"{name} positive")
                mass_axis.plot(r.components["negative_answer_mass"], "-.", color=line.get_color(), label=f"{name} negative")
    ratio_axis.set_yscale("log")
    _finish(ratio_axis, "max|x| / median|x| per layer", "layer", "ratio")
    _finish(kurtosis_axis, "excess kurtosis per layer (mean over tokens)", "layer", "kurtosis")
    _finish(mass_axis, "attention mass of the question on the answer span", "layer", "mass")
    quantized = [m for m in report.models if m.quantization]
    if quantized:
        names = [row.name for row in quantized[0].quantization.rows]
        width = 0.8 / len(quantized)
        for k, m in enumerate(quantized):
            quant_axis.bar([i + k * width for i in range(len(names))],
                           [row.loss_delta for row in m.quantization.rows], width, label=Path(m.model).name or m.model)
        quant_axis.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=20, fontsize="small")
        quant_axis.set_yscale("symlog", linthresh=1e-3)
    _finish(quant_axis, "loss delta after quantization (nats/token)", "", "Δloss")
    figure.tight_layout()
    return figure
