"""`netmorph consolidate`: a sharded FSDP checkpoint of `netmorph train` → a normal Hugging Face checkpoint.

Under FSDP with `fsdp_config.state_dict_type: SHARDED_STATE_DICT` every `checkpoint-N` folder holds the model as
torch.distributed.checkpoint (DCP) shards, one file per rank (`pytorch_model_fsdp_0/`), for `--resume`. This
merges them (accelerate's `merge_fsdp_weights`, run in one process) and adds what a loadable checkpoint needs: the
base model's config.json, tokenizer, generation config and, for differential attention, the modeling files. The
mix buffer is a persistent buffer, so the merged weights hold the mix the checkpoint was trained with.
"""

import shutil
import tempfile
from pathlib import Path

import torch

from netmorph.errors import NetmorphError
from netmorph.io.writer import atomic_output_dir, check_output_dir
from netmorph.surgery.diff import MODELING_FILES
from netmorph.train.run import _tied_aliases, load_training_yaml, training_precision

SHARDED_MODEL = "pytorch_model_fsdp_0"


def consolidate(config_path: str | Path, checkpoint: str | Path, output_dir: str | Path, allow_pickle: bool = False,
                force: bool = False) -> Path:
    """Write `output_dir` (model.safetensors, config.json, tokenizer, modeling files) from the sharded model of
    `checkpoint` (a checkpoint-N folder written under FSDP by `netmorph train CONFIG`), in the dtype `netmorph train`
    saves its final model in, atomically (a temp dir renamed into place). torch.distributed.checkpoint stores its
    `.metadata` as a pickle, which can run code when loaded: without `allow_pickle` this refuses. Raises
    NetmorphError when the folder holds no sharded model, pickles are not allowed, the shards cannot be merged, the
    output path is taken (a file, a non-empty directory without `force`, inside the checkpoint), or the tensors do
    not match the base model's architecture."""
    from accelerate.utils import merge_fsdp_weights
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    import netmorph.auto  # noqa: F401  (registers the differential-attention classes with the Auto classes)

    checkpoint = Path(checkpoint).expanduser()
    shards = checkpoint / SHARDED_MODEL
    if not (shards / ".metadata").is_file():
        raise NetmorphError(f"{checkpoint} holds no sharded FSDP model ({SHARDED_MODEL}/.metadata): pass a "
                            "checkpoint-N folder of a run with fsdp_config.state_dict_type: SHARDED_STATE_DICT")
    if not allow_pickle:
        raise NetmorphError(f"{shards / '.metadata'} is a pickle file (torch.distributed.checkpoint's format) and "
                            "loading a pickle can run code: pass --allow-pickle if you trust where the checkpoint "
                            "came from")
    settings, source = load_training_yaml(config_path)
    out = Path(output_dir).expanduser()
    check_output_dir(out, force, [checkpoint])
    with tempfile.TemporaryDirectory() as merged:
        try:
            merge_fsdp_weights(str(shards), merged)
            weights = load_file(Path(merged) / "model.safetensors")
        except Exception as e:  # DCP raises AssertionError, RuntimeError, pickle errors ... for damaged files
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise NetmorphError(f"cannot merge the sharded model in {shards}: {first}; the checkpoint is damaged "
                                "or incomplete") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(source.config, trust_remote_code=settings.trust_remote_code)
    aliases = _tied_aliases(model)
    expected = set(model.state_dict()) - aliases
    weights = {name: tensor for name, tensor in weights.items() if name not in aliases}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise NetmorphError(f"{checkpoint} does not hold {source.description}'s tensors (missing: "
                            f"{', '.join(missing[:3]) or 'none'}; unexpected: {', '.join(extra[:3]) or 'none'}): "
                            "pass the training YAML the run was started with")
    dtype = training_precision(settings, source, config_path).save_dtype
    weights = {name: (t.to(dtype) if t.is_floating_point() else t).contiguous() for name, t in weights.items()}
    with atomic_output_dir(out) as tmp:
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        config = source.config
        config.dtype = str(dtype).removeprefix("torch.")
        config.save_pretrained(tmp)
        source.save_tokenizer(tmp)
        source.save_generation_config(tmp)
        if source.kind == "hf":
            for name in MODELING_FILES:
                if (source.path / name).exists():
                    shutil.copy2(source.path / name, tmp / name)
    return out
