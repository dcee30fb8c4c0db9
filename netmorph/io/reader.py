"""Lazy readers over checkpoint tensors.

Safetensors tensors are read one at a time with plain file reads straight into the tensor's memory: no shard is
memory-mapped, so a conversion's resident memory is the tensors it holds, not the pages of the shards it has read.
Shapes and dtypes come from the shard headers without reading any data (`describe`, `MetaReader`).
"""

import math
import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from netmorph.errors import NetmorphError

log = logging.getLogger("netmorph")

INDEX_NAME = "model.safetensors.index.json"
# Buffers older checkpoints saved that transformers never reads (it drops them on load): RoPE frequencies
# (`rotary_emb.inv_freq`) and the causal-mask buffers of GPT-2 (`attn.bias`, `attn.masked_bias`) and GPT-NeoX
# (`attention.bias`, `attention.masked_bias`). Readers leave them out, so no command trips over them.
STALE_BUFFERS = re.compile(r"(^|\.)(rotary_emb\.inv_freq|attn\.(masked_)?bias|attention\.(masked_)?bias)$")


def drop_stale_buffers(names: list[str], where) -> list[str]:
    """`names` without STALE_BUFFERS (logged once per checkpoint)."""
    kept = [name for name in names if not STALE_BUFFERS.search(name)]
    if len(kept) != len(names):
        dropped = next(name for name in names if STALE_BUFFERS.search(name))
        log.info("ignoring %d buffers of %s that transformers does not read (e.g. %s)", len(names) - len(kept), where,
                 dropped)
    return kept
# After each tensor, ask the kernel to start reading this much of what follows in the file (tensors are consumed
# roughly in file order): the disk works while the caller converts. Page cache, not this process's memory.
READ_AHEAD_BYTES = 256 * 2**20

# safetensors dtype codes ↔ torch dtypes.
DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
}


@dataclass(frozen=True)
class TensorInfo:
    """What a tensor is, without its data: enough to plan a file layout or build a meta tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        """Number of elements: the product of `shape` (1 for a 0-d tensor)."""
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes: numel × the dtype's item size."""
        return self.numel * self.dtype.itemsize

    def meta(self) -> torch.Tensor:
        """An empty tensor of this shape and dtype on the meta device (no data, no memory)."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(byte offset of the data section from the start of the file, header dict) of a shard already validated by
    `check_safetensors_file` (no checks here). Format: https://github.com/huggingface/safetensors."""
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        return 8 + header_len, json.loads(f.read(header_len))


def check_safetensors_file(path: Path) -> list[str]:
    """Validate a shard's header against its size and return its tensor names (header order, `__metadata__` left
    out). Raises NetmorphError when the file is missing or shorter than 8 bytes, its header runs past the end or is
    not JSON with `data_offsets` for every tensor, or the data runs past the end of the file. Format:
    https://github.com/huggingface/safetensors."""
    size = path.stat().st_size if path.exists() else -1
    if size < 0:
        raise NetmorphError(f"missing safetensors shard {path}: re-download the checkpoint")
    if size < 8:
        raise NetmorphError(f"empty or truncated safetensors file {path} ({size} bytes): re-download the checkpoint")
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise NetmorphError(f"truncated safetensors file {path} (header runs past the end): re-download it")
        try:
            header = json.loads(f.read(header_len))
            names = [name for name in header if name != "__metadata__"]
            data_end = max((int(header[name]["data_offsets"][1]) for name in names), default=0)
            spans = [(name, *(int(offset) for offset in header[name]["data_offsets"]), DTYPES.get(header[name]["dtype"]),
                      math.prod(int(n) for n in header[name]["shape"])) for name in names]
        except (ValueError, KeyError, TypeError, IndexError):
            raise NetmorphError(f"corrupt safetensors header in {path}: re-download the checkpoint") from None
    for name, begin, end, dtype, numel in spans:
        if begin < 0 or end < begin or (dtype is not None and end - begin != numel * dtype.itemsize):
            raise NetmorphError(f"corrupt safetensors header in {path}: {name} spans {end - begin} bytes but its shape "
                                f"needs {numel * (dtype.itemsize if dtype else 1)}; re-download the checkpoint")
    if 8 + header_len + data_end > size:
        raise NetmorphError(
            f"truncated safetensors file {path}: {size} bytes on disk, {8 + header_len + data_end} expected; "
            "re-download the checkpoint"
        )
    return names


def check_finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Return `tensor` unchanged; raise NetmorphError (naming it, with its NaN and ±Inf counts) when it holds NaN or
    ±Inf: converting it would hide a damaged checkpoint behind a model that loads fine and then produces NaN logits
    (and NaN also passes a `diff > tolerance` check silently). Non-floating, empty and meta tensors pass unchecked."""
    if not tensor.is_floating_point() or tensor.numel() == 0 or tensor.device.type == "meta":
        return tensor
    nan, inf = count_nonfinite(tensor)
    if nan or inf:
        raise nonfinite_error(name, nan, inf)
    return tensor


def count_nonfinite(tensor: torch.Tensor) -> tuple[int, int]:
    """(NaN count, ±Inf count) of a floating-point CPU tensor of any shape (1-byte fp8 is counted in float32); one
    fast pass when there are none."""
    values = tensor.float() if tensor.element_size() == 1 else tensor  # fp8 has no isnan kernel on every backend
    if torch.isfinite(values.sum()):
        return 0, 0  # any NaN or ±Inf makes the sum non-finite (a finite overflow falls through to the exact count)
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return 0, 0
    nan = int(torch.isnan(values).sum())
    return nan, int((~finite).sum()) - nan


def nonfinite_error(name: str, nan: int, inf: int) -> NetmorphError:
    """The NetmorphError (returned, not raised) for tensor `name` holding `nan` NaN and `inf` ±Inf values."""
    return NetmorphError(
        f"tensor {name} holds {nan} NaN and {inf} Inf values: the checkpoint is damaged (or saved after a "
        "diverged training step); re-download it or fix that tensor"
    )


# Pieces in which `check_finite_in_file` reads a tensor: small enough to stay in the CPU caches, large enough that
# the per-piece overhead does not count.
CHECK_CHUNK_BYTES = 4 * 2**20


def check_finite_in_file(info: TensorInfo, fd: int, offset: int, buffer: bytearray | None = None) -> None:
    """`check_finite` for a tensor's raw bytes in a file (a tensor copied file to file, never loaded whole): reads
    the `info.nbytes` bytes at byte `offset` of file descriptor `fd` in pieces into one reused `buffer`
    (CHECK_CHUNK_BYTES when None), so the check costs a read from the page cache and no memory. Raises the same
    NetmorphError, with the same counts, as `check_finite` on the whole tensor, and NetmorphError when the file ends
    inside the tensor. Non-floating and empty tensors pass unchecked."""
    if not info.dtype.is_floating_point or not info.nbytes:
        return
    item = info.dtype.itemsize
    buffer = buffer if buffer is not None else bytearray(CHECK_CHUNK_BYTES)
    view = memoryview(buffer)
    step = len(view) - len(view) % item  # whole elements per piece
    nan = inf = done = 0
    while done < info.nbytes:
        want, got = min(step, info.nbytes - done), 0
        while got < want:
            count = os.preadv(fd, [view[got:want]], offset + done + got)
            if not count:
                raise NetmorphError(f"the file ends inside tensor {info.name}: re-download the checkpoint")
            got += count
        piece = torch.frombuffer(buffer, dtype=torch.uint8, count=want).view(info.dtype)
        piece_nan, piece_inf = count_nonfinite(piece)
        nan, inf, done = nan + piece_nan, inf + piece_inf, done + want
    if nan or inf:
        raise nonfinite_error(info.name, nan, inf)


class TensorReader:
    """Name → tensor access to a checkpoint, without loading it all. Every tensor read is checked to be finite."""

    def keys(self) -> list[str]:
        """The names of the tensors this reader holds (stale buffers left out); each subclass implements it."""
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name`, checked by `check_finite`: raises NetmorphError when it holds NaN or ±Inf (and, in every
        reader here, KeyError for a name not in `keys()`)."""
        return check_finite(name, self._read(name))

    def _read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def describe(self, name: str) -> TensorInfo:
        """Shape and dtype of a tensor; readers that can tell without reading it override this."""
        tensor = self.get(name)
        return TensorInfo(name, tuple(tensor.shape), tensor.dtype)

    def file_range(self, name: str) -> tuple[Path, int] | None:
        """(file, byte offset) of the tensor's raw bytes when they lie in a file as they are, else None."""
        return None

    def __contains__(self, name: str) -> bool:
        return name in self.keys()


class SafetensorsReader(TensorReader):
    """The tensors of a Hugging Face model directory: one `*.safetensors` file, or the shards listed in
    `model.safetensors.index.json`.

    The constructor validates every shard's header against the file size (`check_safetensors_file`) and the index
    against the shards. It raises NetmorphError for an unreadable index, a missing, truncated or corrupt shard, an
    index entry whose shard lacks the tensor, a directory without safetensors files, or several files without an
    index. Tensors are read on demand with plain file reads, one shard file open at a time (the last one read stays
    open)."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                    raise ValueError
            except (ValueError, KeyError, TypeError, AttributeError):
                raise NetmorphError(f"corrupt {index}: it has no readable weight_map; re-download it") from None
            for shard in sorted(set(weight_map.values())):
                names = set(check_safetensors_file(directory / shard))
                missing = [name for name, file in weight_map.items() if file == shard and name not in names]
                if missing:
                    raise NetmorphError(f"{index} lists {missing[0]} in {shard}, which does not hold it: re-download")
            self._shard_of = dict(weight_map)
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                raise NetmorphError(f"no safetensors weights in {directory}")
            if len(files) > 1:
                raise NetmorphError(
                    f"{directory} has {len(files)} safetensors files but no {INDEX_NAME}: re-download the checkpoint"
                )
            self._shard_of = {name: files[0].name for name in check_safetensors_file(files[0])}
        kept = set(drop_stale_buffers(list(self._shard_of), directory))
        self._shard_of = {name: shard for name, shard in self._shard_of.items() if name in kept}
        self._headers: dict[str, tuple[int, dict]] = {}
        self._open_name: str | None = None
        self._open_file = None

    def keys(self) -> list[str]:
        """Every tensor name of the checkpoint (stale buffers left out), in the index's (or the header's) order."""
        return list(self._shard_of)

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def _entry(self, name: str) -> tuple[int, dict]:
        shard = self._shard_of[name]
        if shard not in self._headers:
            self._headers[shard] = read_safetensors_header(self.directory / shard)
        data_start, header = self._headers[shard]
        return data_start, header[name]

    def describe(self, name: str) -> TensorInfo:
        """Shape and dtype from the shard's JSON header; no data is read. Raises NetmorphError for a dtype not in
        DTYPES, KeyError for an unknown name."""
        _, entry = self._entry(name)
        if entry["dtype"] not in DTYPES:
            raise NetmorphError(f"tensor {name} has dtype {entry['dtype']}, which netmorph cannot read")
        return TensorInfo(name, tuple(entry["shape"]), DTYPES[entry["dtype"]])

    def file_range(self, name: str) -> tuple[Path, int]:
        """(shard path, byte offset of the tensor's first byte from the start of that file): its raw little-endian
        bytes lie there as they are. Raises KeyError for an unknown name."""
        data_start, entry = self._entry(name)
        return self.directory / self._shard_of[name], data_start + entry["data_offsets"][0]

    def _read(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory (one file read, no memory map; only this shard's file is open)."""
        info = self.describe(name)
        data_start, entry = self._entry(name)
        begin, end = entry["data_offsets"]
        shard = self._shard_of[name]
        if shard != self._open_name:
            if self._open_file is not None:
                self._open_file.close()
            self._open_file = (self.directory / shard).open("rb", buffering=0)
            self._open_name = shard
        data = torch.empty(end - begin, dtype=torch.uint8)
        self._open_file.seek(data_start + begin)
        view, done = memoryview(data.numpy()), 0
        while done < len(view):
            count = self._open_file.readinto(view[done:])
            if not count:
                raise NetmorphError(f"{self.directory / shard} ends inside tensor {name}: re-download the checkpoint")
            done += count
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._open_file.fileno(), data_start + end, READ_AHEAD_BYTES, os.POSIX_FADV_WILLNEED)
        return data.view(info.dtype).reshape(info.shape)


class StateDictReader(TensorReader):
    """Tensors already in memory (a dequantized GGUF file, an explicitly allowed pickle checkpoint)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        kept = set(drop_stale_buffers(list(state_dict), "the checkpoint"))
        self._tensors = {name: tensor for name, tensor in state_dict.items() if name in kept}

    def keys(self) -> list[str]:
        """The state dict's names, stale buffers left out."""
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def _read(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def _gguf_can_dequantize(tensor_type) -> bool:
    """Ask the installed gguf package itself: dequantize one all-zero block of this type."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, dequantize

    _, type_size = GGML_QUANT_SIZES[tensor_type]
    try:
        dequantize(np.zeros((1, type_size), dtype=np.uint8), tensor_type)
    except NotImplementedError:
        return False
    return True


def check_gguf_file(path: Path) -> None:
    """Refuse a GGUF file holding a tensor type the installed `gguf` package cannot dequantize: raises NetmorphError
    naming the tensor and its type, or when the file cannot be parsed; returns None otherwise. Called when
    transformers' GGUF load fails (parsing the file costs seconds, so not on the happy path)."""
    from gguf import GGUFReader

    try:
        tensors = GGUFReader(str(path)).tensors
    except Exception as e:  # the GGUF parser raises many types for a damaged file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NetmorphError(f"cannot read GGUF file {path}: {first_line}; re-download it") from None
    for tensor_type in sorted({t.tensor_type for t in tensors}):
        if not _gguf_can_dequantize(tensor_type):
            name = next(t.name for t in tensors if t.tensor_type == tensor_type)
            raise NetmorphError(
                f"GGUF tensor {name} in {path} has type {tensor_type.name}, which the installed gguf package cannot "
                "dequantize: use a file quantized as F32, F16, BF16, Q8_0 or a K-quant (Q4_K, Q6_K, ...)"
            )


class MetaReader(TensorReader):
    """Meta tensors (shape and dtype, no data) for every tensor of another reader: running a conversion on it
    yields the exact names, shapes and dtypes of the output, i.e. the manifest a streaming writer needs, in
    microseconds and without memory."""

    def __init__(self, reader: TensorReader):
        self._reader = reader

    def keys(self) -> list[str]:
        """The wrapped reader's names."""
        return self._reader.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._reader

    def describe(self, name: str) -> TensorInfo:
        """The wrapped reader's shape and dtype of `name` (a SafetensorsReader reads no data for it)."""
        return self._reader.describe(name)

    def get(self, name: str) -> torch.Tensor:
        """A meta tensor with the wrapped tensor's shape and dtype: no data is read and nothing is checked for
        NaN/Inf (there are no values)."""
        return self._reader.describe(name).meta()
