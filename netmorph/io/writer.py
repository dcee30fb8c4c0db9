"""Sharded safetensors writer and the atomic output directory (temp dir → rename, nothing partial left behind)."""

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from netmorph.errors import NetmorphError
from netmorph.io.reader import INDEX_NAME


class ShardedWriter:
    """Collects tensors and flushes a shard whenever the next tensor would exceed `max_shard_bytes`.

    Shards get their final `model-0000i-of-0000n` names in `finish()`, when n is known; a single shard becomes
    `model.safetensors` with no index.
    """

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.directory / f"shard-{len(self._shards):05d}.partial"
        try:
            save_file(self._pending, str(path), metadata={"format": "pt"})
        except SafetensorError as e:  # an I/O failure inside the Rust writer: hand it on as the OSError it is
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        if self._pending or not self._shards:
            self._flush()
        if len(self._shards) == 1:
            final = self.directory / "model.safetensors"
            self._shards[0][0].rename(final)
            return [final]
        n = len(self._shards)
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self._shards, start=1):
            final = self.directory / f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return files


def check_output_dir(output_dir: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse before any work: a non-empty output without --force, or an output inside (or equal to) an input."""
    resolved = output_dir.resolve()
    for source in inputs:
        source = source.resolve()
        source_dir = source if source.is_dir() else source.parent
        if resolved == source_dir or source_dir in resolved.parents:
            raise NetmorphError(f"output dir {output_dir} is inside the input {source_dir}: choose a path outside it")
    if output_dir.exists():
        if not output_dir.is_dir():
            raise NetmorphError(f"output path {output_dir} is a file: choose a directory path")
        if any(output_dir.iterdir()) and not force:
            raise NetmorphError(f"output dir {output_dir} is not empty: pass --force to replace it")


# Failures of the output location (not of netmorph): turned into one line naming the location and the fix.
_FULL = "free space there or choose another --output-dir"
_READ_ONLY = "choose a writable --output-dir"
STORAGE_ERRORS = {
    errno.ENOSPC: ("the disk is full", _FULL),
    errno.EDQUOT: ("the disk quota is exceeded", _FULL),
    errno.EFBIG: ("the file size limit was reached (disk full or `ulimit -f`)", _FULL),
    errno.EACCES: ("permission denied", _READ_ONLY),
    errno.EPERM: ("permission denied", _READ_ONLY),
    errno.EROFS: ("the file system is read-only", _READ_ONLY),
}
PARTIAL_MARK = ".partial-"


def storage_error(error: OSError, location: Path) -> NetmorphError | None:
    """The one-line error for a disk-full / read-only / permission failure, None for any other OSError."""
    if error.errno not in STORAGE_ERRORS:
        return None
    problem, fix = STORAGE_ERRORS[error.errno]
    return NetmorphError(f"cannot write the output in {location}: {problem}; {fix}")


def _partial_prefix(output_dir: Path) -> str:
    """`.NAME.partial-HOST-` : the temp dirs of one output; the writer's pid follows, so a stale one can be told
    from one still being written."""
    return f".{output_dir.name}{PARTIAL_MARK}{socket.gethostname()}-"


def _remove_stale_partials(output_dir: Path) -> None:
    """Delete temp dirs left beside `output_dir` by killed runs on this host (their pid no longer exists).
    Temp dirs of live processes and of other hosts (shared file systems) are left alone."""
    prefix = _partial_prefix(output_dir)
    for path in output_dir.parent.glob(f"{glob.escape(prefix)}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _sync_tree(directory: Path) -> None:
    """fsync every file and the directory, so the rename publishes data that is on disk, not only in cache."""
    for path in directory.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output_dir(output_dir: Path):
    """Yield a temp dir beside `output_dir`; on success it replaces `output_dir` in one rename, on any failure
    (exception or Ctrl-C) it is removed, as are parent dirs created for it. A run killed outright (SIGKILL, power
    loss) leaves only its temp dir `.NAME.partial-HOST-PID-*`, never a partial `output_dir`; the next run removes it.
    A disk-full, read-only or permission failure becomes a one-line NetmorphError."""
    created = [p for p in [output_dir.parent, *output_dir.parent.parents] if not p.exists()]
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(output_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(output_dir)}{os.getpid()}-", dir=output_dir.parent))
    except OSError as e:
        raise storage_error(e, output_dir.parent) or NetmorphError(
            f"cannot write to {output_dir.parent}: {e.strerror}; choose a writable --output-dir"
        ) from None
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        _sync_tree(tmp)
        if output_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            output_dir.rename(trash / "old")
            tmp.rename(output_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(output_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:
            with contextlib.suppress(OSError):
                parent.rmdir()
        if isinstance(e, OSError) and (error := storage_error(e, output_dir.parent)):
            raise error from None
        raise
