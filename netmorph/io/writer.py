"""The output directory: checked before any work, written atomically (temp dir → rename, nothing partial left behind)."""

import contextlib
import errno
import glob
import os
import shutil
import socket
import tempfile
from pathlib import Path

from netmorph.errors import NetmorphError


def check_output_dir(output_dir: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse before any work: raises NetmorphError for an output inside (or equal to) the directory of an input, an
    output path that is a file, or a non-empty output directory without --force."""
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
