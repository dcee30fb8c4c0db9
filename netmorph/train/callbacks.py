"""Hugging Face `TrainerCallback`s for differential-attention models: λ mix warm-up and a metrics monitor.

Both work with any Trainer (ours, axolotl's, TRL's): they only touch modules that have a `mix` buffer and
`lambda_full()`, i.e. netmorph's differential attention. The mix is a persistent buffer, so a checkpoint saved
mid-warm-up reloads with the mix it was trained with, and a resumed run continues the schedule from
`state.global_step`.
"""

import torch
from transformers import TrainerCallback


def mix_at(completed_steps: int, warmup_steps: int | None) -> float:
    """The mix used by the optimizer step that follows `completed_steps` steps: linear 0 → 1 over
    `warmup_steps` steps; without warm-up (None or 0) it is 1 from the first step."""
    if not warmup_steps:
        return 1.0
    return min(1.0, completed_steps / warmup_steps)


def diff_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The differential-attention modules of `model`, in layer order (works through DDP/FSDP/PEFT wrappers): V1
    modules (λ vectors, `mix` buffer, `lambda_full()`) and DIFF V2 modules (`layout == "v2"`, `lambda_proj`)."""
    return [m for m in model.modules() if is_v2(m) or (
        hasattr(m, "lambda_full") and isinstance(getattr(m, "mix", None), torch.Tensor))]


def is_v2(module) -> bool:
    """A DIFF V2 attention: per-token λ = sigmoid(lambda_proj(x)), no λ vectors and no mix."""
    return getattr(module, "layout", None) == "v2" and hasattr(module, "lambda_proj")


def token_lambda(module, hidden: torch.Tensor) -> torch.Tensor | float:
    """The λ a layer applies to input `hidden` (B, T, D): DIFF V2's (B, heads, T, 1) per-token values, else the
    scalar λ_full (mix included)."""
    if is_v2(module):
        return torch.sigmoid(module.lambda_proj(hidden)).float().transpose(1, 2).unsqueeze(-1)
    return module.lambda_full().item()


def set_mix(model: torch.nn.Module, value: float) -> int:
    """Write `value` into every differential-attention `mix` buffer; returns how many were set."""
    modules = [m for m in diff_attention_modules(model) if not is_v2(m)]  # DIFF V2 is exact without a mix
    for module in modules:
        module.mix.fill_(value)
    return len(modules)


def monitored_layers(num_layers: int, count: int) -> list[int]:
    """`count` layer indices strided over the depth, first and last included: round(i·(L−1)/(k−1))."""
    if count >= num_layers:
        return list(range(num_layers))
    if count == 1:
        return [0]
    return sorted({round(i * (num_layers - 1) / (count - 1)) for i in range(count)})


class DiffAttnWarmupCallback(TrainerCallback):
    """Sets the mix before every optimizer step from the global step, and after it to the value of the next step, so
    saved checkpoints and the final model hold the mix the schedule has reached."""

    def __init__(self, warmup_steps: int | None):
        self.warmup_steps = warmup_steps

    def _apply(self, state, model) -> None:
        if model is not None:
            set_mix(model, mix_at(state.global_step, self.warmup_steps))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """TrainerCallback hook: sets the mix for the starting (or resumed) global step."""
        self._apply(state, model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        """TrainerCallback hook: sets the mix of the optimizer step about to run."""
        self._apply(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        """TrainerCallback hook: sets the mix of the next step, so a checkpoint saved now holds the scheduled value."""
        self._apply(state, model)


def attention_input(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The hidden states and (cos, sin) a differential-attention module is called with, from a forward pre-hook
    ((cos, sin) is None for a family without rotary embeddings: GPT-2)."""
    return kwargs.get("hidden_states", args[0] if args else None), kwargs.get("position_embeddings")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter that FSDP2 (`fully_shard`) holds as a sharded DTensor between steps, gathered
    from every rank (a collective: every rank must call it); any other tensor as it is."""
    gather = getattr(tensor, "full_tensor", None)
    return gather() if callable(gather) else tensor


def lambda_metrics(module) -> dict[str, float]:
    """λ figures of one layer: vector norms, λ1, λ2, λ_init, λ_full (without the mix, as the paper defines it).
    DIFF V2: the norm of lambda_proj (its per-token λ comes from the captured forward pass). Under FSDP2 the
    parameters are gathered first, so every rank must call it for the same layers in the same order."""
    if is_v2(module):
        return {"lambda_proj_norm": full_tensor(module.lambda_proj.weight.detach()).float().norm().item()}
    with torch.no_grad():
        vectors = {name: full_tensor(getattr(module, name).detach()).float()
                   for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}
        lambda_1 = torch.exp((vectors["lambda_q1"] * vectors["lambda_k1"]).sum()).item()
        lambda_2 = torch.exp((vectors["lambda_q2"] * vectors["lambda_k2"]).sum()).item()
        lambda_init = module.lambda_init.float().item()
        metrics = {f"{name}_norm": v.norm().item() for name, v in vectors.items()}
    return metrics | {"lambda1": lambda_1, "lambda2": lambda_2, "lambda_init": lambda_init,
                      "lambda_full": lambda_1 - lambda_2 + lambda_init}


def branch_metrics(positive: torch.Tensor, negative: torch.Tensor, lam: float | torch.Tensor) -> dict[str, float]:
    """Statistics of the two softmax maps (B, heads, T, T) and of the differential map `pos − λ·neg` over the causal
    region: mean and std of the weights, mean row entropy (nats) and, for the differential map, the fraction of
    negative weights (how much noise it cancels)."""
    length = positive.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=positive.device).tril()
    metrics = {}
    for name, probs in (("attn_pos", positive), ("attn_neg", negative)):
        weights = probs[..., causal]
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
        metrics |= {f"{name}_mean": weights.mean().item(), f"{name}_std": weights.std().item(),
                    f"{name}_entropy": entropy.mean().item()}
    diff = (positive - lam * negative)[..., causal]
    metrics |= {"attn_diff_mean": diff.mean().item(), "attn_diff_std": diff.std().item(),
                "attn_diff_negative_fraction": (diff < 0).float().mean().item()}
    return metrics


class DiffAttnMonitorCallback(TrainerCallback):
    """Every `log_every` optimizer steps, reports for the monitored layers the λ figures and statistics of the
    positive, negative and differential attention maps, plus aggregates over all layers, through `trainer.log` — so
    they reach every `report_to` integration (TensorBoard, wandb, …) and `trainer_state.json`.

    The attention statistics come from the step's own forward pass: a forward pre-hook on each monitored layer
    recomputes the two maps of the first sequence (at most `max_tokens` tokens) and keeps only the scalars.
    """

    def __init__(self, log_every: int, num_monitor_layers: int = 3, trainer=None, max_tokens: int = 256):
        self.log_every = log_every
        self.num_monitor_layers = num_monitor_layers
        self.trainer = trainer
        self.max_tokens = max_tokens
        self._layers: dict[int, torch.nn.Module] = {}
        self._hooks = []
        self._armed: set[int] = set()
        self._branch: dict[int, dict[str, float]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """TrainerCallback hook: picks the monitored layers (`monitored_layers`) and registers a forward pre-hook on
        each."""
        modules = diff_attention_modules(model)
        indices = monitored_layers(len(modules), self.num_monitor_layers) if modules else []
        self._layers = {i: modules[i] for i in indices}
        self._hooks = [m.register_forward_pre_hook(self._capture(i), with_kwargs=True) for i, m in self._layers.items()]

    def on_train_end(self, args, state, control, **kwargs):
        """TrainerCallback hook: removes the forward pre-hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def on_step_begin(self, args, state, control, **kwargs):
        """TrainerCallback hook: arms the pre-hooks when the coming step is a logging step."""
        if (state.global_step + 1) % self.log_every == 0:
            self._armed = set(self._layers)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        """TrainerCallback hook: on a logging step, logs `metrics(model)` through `trainer.log` (main process only,
        keeping the Trainer's own should_log) and clears the captured statistics. Raises RuntimeError when `trainer`
        was never set."""
        if not self._layers or state.global_step % self.log_every:
            return
        self._armed = set()
        if self.trainer is None:
            raise RuntimeError("DiffAttnMonitorCallback needs the trainer: set callback.trainer = trainer")
        # Every rank computes the figures (under FSDP2 that gathers the sharded λ parameters, a collective), and
        # only the first logs them: one entry per step in the log history and in every report_to backend.
        figures = self.metrics(model)
        if state.is_world_process_zero:
            should_log = control.should_log  # trainer.log resets it: keep the Trainer's own loss logging this step
            self.trainer.log(figures)
            control.should_log = should_log
        self._branch = {}
        return control

    def metrics(self, model) -> dict[str, float]:
        """The figures for the current weights (and the branch statistics captured during the last step)."""
        modules = diff_attention_modules(model)
        out = {}
        if is_v2(modules[0]):
            norms = [lambda_metrics(m)["lambda_proj_norm"] for m in modules]
            out["diff_attn/lambda_proj_norm_mean"] = sum(norms) / len(norms)
        else:
            out["diff_attn/mix"] = modules[0].mix.float().item()
            lambdas = [lambda_metrics(m)["lambda_full"] for m in modules]
            out |= {"diff_attn/lambda_full_mean": sum(lambdas) / len(lambdas),
                    "diff_attn/lambda_full_min": min(lambdas), "diff_attn/lambda_full_max": max(lambdas)}
        for index in self._layers:
            figures = lambda_metrics(modules[index]) | self._branch.get(index, {})
            out |= {f"diff_attn/layer_{index}/{name}": value for name, value in figures.items()}
        fractions = [b["attn_diff_negative_fraction"] for b in self._branch.values()]
        if fractions:
            out["diff_attn/attn_diff_negative_fraction_mean"] = sum(fractions) / len(fractions)
        return out

    def _capture(self, index: int):
        def hook(module, args, kwargs):
            """Forward pre-hook: on the first call after arming, records the branch statistics (and DIFF V2's
            per-token λ mean and std) of the first sequence, at most `max_tokens` tokens."""
            if index not in self._armed:
                return
            self._armed.discard(index)  # first micro-batch only (and not again under gradient checkpointing)
            hidden, rotary = attention_input(args, kwargs)
            tokens = min(hidden.shape[1], self.max_tokens)
            if rotary is not None:
                rotary = tuple(part[:1, :tokens] for part in rotary)
            positive, negative = module.branch_probabilities(hidden[:1, :tokens], rotary)
            with torch.no_grad():
                lam = token_lambda(module, hidden[:1, :tokens])
            self._branch[index] = branch_metrics(positive, negative, lam)
            if isinstance(lam, torch.Tensor):  # DIFF V2: the per-token λ of this sequence
                self._branch[index] |= {"lambda_mean": lam.mean().item(), "lambda_std": lam.std().item()}

        return hook
