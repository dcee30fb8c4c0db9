"""axolotl plugin for differential-attention models converted by netmorph.

Enable it in the YAML (the converter's config.yml already does):

    plugins:
      - netmorph.integrations.axolotl.DifferentialTransformerPlugin
    diff_attention: true
    diff_attn_warmup_steps: 1000      # mix 0 → 1 linearly; unset: 1 from the first step
    diff_attn_log_every: 100          # unset: no metrics
    diff_attn_num_monitor_layers: 3

The plugin registers netmorph's model classes before axolotl loads the model (no remote code needed) and adds the
λ warm-up and monitor callbacks to axolotl's trainer. Metrics go through `trainer.log`, so they reach whatever
`report_to`/`use_wandb`/`use_tensorboard` the run uses.
"""

from axolotl.integrations.base import BasePlugin

from netmorph.train.callbacks import DiffAttnMonitorCallback, DiffAttnWarmupCallback, diff_attention_modules

ARGS = "netmorph.integrations.axolotl.args.DiffAttnArgs"


class DifferentialTransformerPlugin(BasePlugin):
    """λ warm-up and differential-attention metrics for axolotl runs of netmorph checkpoints."""

    def get_input_args(self) -> str:
        """axolotl hook: the dotted path of the plugin's YAML keys (`DiffAttnArgs`), which axolotl merges into its
        config schema."""
        return ARGS

    def pre_model_load(self, cfg) -> None:
        """axolotl hook: imports netmorph.auto, which registers the netmorph_diff_* classes with AutoConfig /
        AutoModelForCausalLM before axolotl loads the model."""
        import netmorph.auto  # noqa: F401  (registers the netmorph_diff_* classes with AutoConfig / AutoModelForCausalLM)

    def post_model_load(self, cfg, model) -> None:
        """axolotl hook: raises ValueError when the YAML says `diff_attention: true` but the loaded model has no
        differential-attention module."""
        if cfg.diff_attention and not diff_attention_modules(model):
            raise ValueError(f"diff_attention is true but {cfg.base_model} has no differential attention: convert it "
                             "first with `netmorph convert-diff-transformer`")

    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        """axolotl hook: the λ warm-up callback, plus the metrics monitor when `diff_attn_log_every` is set (3
        monitored layers when `diff_attn_num_monitor_layers` is unset); [] for a model without differential
        attention."""
        if not diff_attention_modules(trainer.model):
            return []
        callbacks = [DiffAttnWarmupCallback(cfg.diff_attn_warmup_steps)]
        if cfg.diff_attn_log_every:
            callbacks.append(DiffAttnMonitorCallback(cfg.diff_attn_log_every, cfg.diff_attn_num_monitor_layers or 3,
                                                     trainer=trainer))
        return callbacks
