"""Streaming safetensors output for checkpoints larger than RAM.

A command that writes a checkpoint runs its conversion twice: first on meta tensors (`MetaReader`) into a
`ManifestRecorder`, which yields the names, shapes and dtypes of every output tensor at no cost; then for real into a
`StreamingWriter` built from that manifest. Knowing the manifest, the writer lays out every shard up front (header first,
each tensor's offset fixed) and writes each tensor to its place on disk the moment it is produced, so memory holds
only the tensors being converted, whatever the model size.

The files are byte-identical to what `safetensors.torch.save_file` writes for the same tensors (same header,
same data order); a new shard starts whenever the next tensor would push the current one past the limit.
"""

import ctypes
import errno
import json
import os
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from netmorph.io.reader import CHECK_CHUNK_BYTES, DTYPES, INDEX_NAME, TensorReader, TensorInfo, check_finite_in_file

SAFETENSORS_CODES = {dtype: code for code, dtype in DTYPES.items()}
# The order of safetensors' Dtype enum: `save_file` writes tensors by descending dtype, then by name.
_DTYPE_RANK = {code: rank for rank, code in enumerate(
    ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16",
     "I32", "U32", "F32", "C64", "F64", "I64", "U64")
)}
_HEADER_ALIGNMENT = 8
# Bytes handed to the background writer thread and not yet written: what overlapping disk writes with reading and
# converting the next tensors may cost in memory (one larger tensor is still accepted on its own).
MAX_BYTES_IN_FLIGHT = 512 * 2**20


class ManifestRecorder:
    """Stands in for a writer and records what would be written (run the conversion on meta tensors with it)."""

    def __init__(self):
        self.infos: list[TensorInfo] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Record `name` with `tensor`'s shape and dtype (a meta tensor is enough: no data is read)."""
        self.infos.append(TensorInfo(name, tuple(tensor.shape), tensor.dtype))


class CastingWriter:
    """Wraps a writer so that every floating-point tensor is stored in `dtype` (an output dtype other than the
    source's). It has no `add_file_range`, so tensors kept as they are are read and cast, not copied as bytes."""

    def __init__(self, writer, dtype: torch.dtype):
        self.writer, self.dtype = writer, dtype

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Hand `tensor` to the wrapped writer, cast to `dtype` when it is floating point (other dtypes as they are)."""
        self.writer.add(name, tensor.to(self.dtype) if tensor.is_floating_point() else tensor)


def record_manifest(produce: Callable[[ManifestRecorder], None]) -> list[TensorInfo]:
    """The output manifest of `produce(writer)`: call it with a recorder (it should read from a `MetaReader`);
    TensorInfo in production order. Raises ValueError when the conversion writes a name twice."""
    recorder = ManifestRecorder()
    produce(recorder)
    names = [info.name for info in recorder.infos]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise ValueError(f"the conversion writes {duplicate} twice")
    return recorder.infos


def split_into_shards(manifest: list[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    """Greedy split in production order: a new shard starts when the next tensor would pass `max_shard_bytes` (bytes
    of tensor data, headers not counted; a tensor larger than that gets a shard of its own)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in manifest:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


def safetensors_layout(infos: list[TensorInfo], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """(the 8-byte little-endian header length + the JSON header, padded with spaces to a multiple of 8 as
    `save_file` pads it; each tensor's byte offset from the start of the file). Tensors are placed by descending
    dtype, then name, as `save_file` orders them. KeyError for a dtype not in DTYPES. Format:
    https://github.com/huggingface/safetensors."""
    ordered = sorted(infos, key=lambda info: (-_DTYPE_RANK[SAFETENSORS_CODES[info.dtype]], info.name))
    header: dict = {"__metadata__": metadata}
    offsets, position = {}, 0
    for info in ordered:
        header[info.name] = {
            "dtype": SAFETENSORS_CODES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [position, position + info.nbytes],
        }
        offsets[info.name] = position
        position += info.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % _HEADER_ALIGNMENT)
    prefix = len(text).to_bytes(8, "little") + text
    return prefix, {name: len(prefix) + offset for name, offset in offsets.items()}


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _reserve(fd: int, size: int) -> None:
    """Allocate the file's blocks now: a disk too small for the output fails here, before any conversion work."""
    if not size:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)  # a file system without allocation: the space is claimed as the data arrives


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (`numel × itemsize` bytes), without a copy when it is already
    contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class StreamingWriter:
    """Writes a planned checkpoint tensor by tensor: each `add` goes straight to its offset in its shard file.

    Shard files get their final names at once (`model-0000i-of-0000n.safetensors`, or `model.safetensors` for one
    shard) — the caller writes inside `atomic_output_dir`, so nothing is visible before the whole run succeeds.
    Space for every shard is reserved when the writer is created, so a full disk fails before any work.
    Tensors may arrive in any order; `finish` checks that every planned tensor arrived and writes the index.
    `add_file_range` takes a tensor that lies unchanged in another file: the kernel copies it, file to file.
    Writes run on one background thread (NaN/Inf checks of file-to-file copies on a second one, ahead of them), so
    the disk works while the caller reads and converts the next tensors;
    `add` waits once more than `MAX_BYTES_IN_FLIGHT` are queued, and a write error is raised by the next `add` or
    by `finish`.
    """

    def __init__(self, directory: Path, manifest: list[TensorInfo], max_shard_bytes: int, progress: bool = False,
                 description: str = "writing"):
        self.directory = directory
        self.total_bytes = sum(info.nbytes for info in manifest)
        self._manifest = list(manifest)
        self._infos = {info.name: info for info in manifest}
        shards = split_into_shards(manifest, max_shard_bytes)
        if len(shards) == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        self.files = [directory / name for name in names]
        self._place: dict[str, tuple[int, int]] = {}  # tensor → (shard index, byte offset)
        self._unwritten: list[int] = []  # tensors still to come, per shard (the file closes at 0)
        self._fds: dict[int, int] = {}
        for index, (path, infos) in enumerate(zip(self.files, shards)):
            prefix, offsets = safetensors_layout(infos, {"format": "pt"})
            self._place.update({name: (index, offset) for name, offset in offsets.items()})
            self._unwritten.append(len(infos))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[index] = fd
            _reserve(fd, len(prefix) + sum(info.nbytes for info in infos))
            _pwrite_all(fd, memoryview(prefix), 0)
        self._written: set[str] = set()
        self._progress = _progress_bar(self.total_bytes, progress, description)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netmorph-writer")
        self._in_flight: deque[tuple[Future, int]] = deque()
        self._in_flight_bytes = 0
        self._progress_after: dict[Future, int] = {}  # bytes of file-to-file copies, counted when done
        self._checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netmorph-check")
        self._check_buffer: bytearray | None = None  # the checker thread's buffer for `check_finite_in_file`

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue a CPU tensor for writing at its planned offset (its memory is read later by the writer thread: do
        not modify it in place afterwards). Blocks while more than MAX_BYTES_IN_FLIGHT bytes are queued. Raises
        ValueError when `name` is not in the manifest, was already added, or has another shape or dtype than planned;
        re-raises the error of an earlier queued write (OSError) or file-to-file NaN/Inf check (NetmorphError)."""
        info = self._check(name, tuple(tensor.shape), tensor.dtype)
        self._written.add(name)
        while self._in_flight and (self._in_flight[0][0].done()
                                   or self._in_flight_bytes + info.nbytes > MAX_BYTES_IN_FLIGHT):
            self._retire_oldest()
        index, offset = self._place[name]
        # The bytes view keeps the tensor alive until the writer thread is done with it.
        future = self._thread.submit(self._write, index, tensor_bytes(tensor), offset)
        self._in_flight.append((future, info.nbytes))
        self._in_flight_bytes += info.nbytes

    def add_file_range(self, name: str, info: TensorInfo, path: Path, offset: int, check_finite: bool = False) -> None:
        """A tensor whose bytes lie unchanged in another file, at byte `offset` of `path` (a tensor passed through a
        conversion): the kernel copies them file to file, as `cp` does, without them ever entering this process's
        memory. With `check_finite`, a second thread first reads them piece by piece and refuses NaN/Inf
        (`check_finite_in_file`), running ahead of the copies; the error (NetmorphError) surfaces from a later `add`
        or from `finish`, and the copy of a refused tensor never starts. Raises ValueError as `add` does."""
        self._check(name, info.shape, info.dtype)
        self._written.add(name)
        while self._in_flight and self._in_flight[0][0].done():
            self._retire_oldest()
        index, destination = self._place[name]
        checked = self._checker.submit(self._check_finite, info, path, offset) if check_finite else None
        future = self._thread.submit(self._copy, index, info, path, offset, destination, checked)
        self._in_flight.append((future, 0))  # no memory held while it waits
        self._progress_after[future] = info.nbytes

    def _check_finite(self, info: TensorInfo, path: Path, offset: int) -> None:
        """On the checker thread, with its one reused buffer."""
        if self._check_buffer is None:
            self._check_buffer = bytearray(CHECK_CHUNK_BYTES)
        source = os.open(path, os.O_RDONLY)
        try:
            check_finite_in_file(info, source, offset, self._check_buffer)
        finally:
            os.close(source)

    def _copy(self, index: int, info: TensorInfo, path: Path, offset: int, destination: int,
              checked: Future | None) -> None:
        if checked is not None:
            checked.result()  # NaN/Inf: raised here, so in the caller's thread by `_retire_oldest`
        source = os.open(path, os.O_RDONLY)
        nbytes = info.nbytes
        try:
            done = 0
            while done < nbytes:
                try:
                    count = os.copy_file_range(source, self._fds[index], nbytes - done, offset + done,
                                               destination + done)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    count = 0
                if not count:  # no in-kernel copy here (or the source ended): read and write this piece
                    chunk = os.pread(source, min(nbytes - done, 64 * 2**20), offset + done)
                    if not chunk:
                        raise OSError(errno.EIO, f"{path} ends before the bytes of a tensor it should hold")
                    _pwrite_all(self._fds[index], memoryview(chunk), destination + done)
                    count = len(chunk)
                done += count
        finally:
            os.close(source)
        self._done_with(index)

    def _write(self, index: int, data: memoryview, offset: int) -> None:
        """On the writer thread, the only one touching the shard files once they are laid out."""
        _pwrite_all(self._fds[index], data, offset)
        self._done_with(index)

    def _done_with(self, index: int) -> None:
        self._unwritten[index] -= 1
        if not self._unwritten[index]:
            self._close(index)

    def _check(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> TensorInfo:
        info = self._infos.get(name)
        if info is None or name in self._written:
            raise ValueError(f"{name} is {'written twice' if info else 'not in the output manifest'}")
        if shape != info.shape or dtype != info.dtype:
            raise ValueError(f"{name}: recorded {info.shape} {info.dtype}, produced {shape} {dtype}")
        return info

    def _retire_oldest(self) -> None:
        future, nbytes = self._in_flight.popleft()
        self._in_flight_bytes -= nbytes
        future.result()  # a failed write (disk full, I/O error) raises here, in the caller's thread
        if self._progress is not None:
            self._progress.update(self._progress_after.pop(future, nbytes))

    def _close(self, index: int) -> None:
        os.close(self._fds.pop(index))

    def finish(self) -> list[Path]:
        """Wait for every queued write, write `model.safetensors.index.json` (weight_map, total_size in bytes) when
        there are several shards, and return the shard paths. Raises the first failed write's error (OSError, or
        NetmorphError for NaN/Inf in a copied tensor), or ValueError when a manifest tensor was never added."""
        while self._in_flight:
            self._retire_oldest()
        self._thread.shutdown()
        self._checker.shutdown()
        missing = [name for name in self._infos if name not in self._written]
        if missing:
            raise ValueError(f"{len(missing)} planned tensors were never written, the first is {missing[0]}")
        if self._progress is not None:
            self._progress.close()
        if len(self.files) > 1:
            weight_map = {info.name: self.files[self._place[info.name][0]].name for info in self._manifest}
            index_data = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / INDEX_NAME).write_text(json.dumps(index_data, indent=2) + "\n")
        return self.files

    def close(self) -> None:
        """Stop writing and release the open shard files (after a failure; `finish` closes them as they complete)."""
        for future, _ in self._in_flight:
            future.cancel()
        self._thread.shutdown(wait=True)
        self._checker.shutdown(wait=True, cancel_futures=True)
        self._in_flight.clear()
        for index in list(self._fds):
            self._close(index)
        if self._progress is not None:
            self._progress.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def pass_through(reader: TensorReader, writer, name: str, output_name: str | None = None) -> None:
    """A tensor a command keeps as it is (under `output_name`, if it moves): copied file to file by the kernel when
    the reader knows where its bytes lie and the writer can copy (a `StreamingWriter`, whose thread also checks them
    to be finite, reading them once from the page cache in small pieces), else read (checked to be finite),
    written and dropped. On a `MetaReader` into a `ManifestRecorder` it plans the tensor."""
    location = reader.file_range(name)
    if location is not None and hasattr(writer, "add_file_range"):
        writer.add_file_range(output_name or name, reader.describe(name), *location, check_finite=True)
    else:
        writer.add(output_name or name, reader.get(name))


def release_freed_memory() -> None:
    """Hand memory freed by dropped tensors back to the OS. glibc keeps freed blocks below its (adaptive, up to
    32 MiB) mmap threshold in the heap, where fragmentation makes the resident size creep up layer after layer;
    `malloc_trim` returns them, so RSS tracks what is live. A no-op off glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _progress_bar(total_bytes: int, enabled: bool, description: str):
    """A byte progress bar on stderr, only when asked for and stderr is a terminal (logs stay clean)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=description, file=sys.stderr,
                dynamic_ncols=True)
