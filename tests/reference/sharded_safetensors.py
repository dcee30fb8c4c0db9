"""The checkpoint layout netmorph's StreamingWriter must produce, written the plain way: the tensors in order, a new
shard whenever the next tensor would push the current one past `max_shard_bytes`, each shard saved whole by
`safetensors.torch.save_file`, and — for more than one shard — Hugging Face's `model-0000i-of-0000n.safetensors`
names with a `model.safetensors.index.json` (total_size in bytes, weight_map name → file)."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_sharded(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> list[Path]:
    """Write `tensors` (in their order) as a sharded safetensors checkpoint in `directory`; returns the files."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return [directory / "model.safetensors"]
    files, weight_map = [], {}
    for number, shard in enumerate(shards, start=1):
        path = directory / f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        files.append(path)
        weight_map.update({name: path.name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


class Collector:
    """A writer for the conversion loops (`add(name, tensor)`) that keeps what it is given, in order."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor.detach().clone()
