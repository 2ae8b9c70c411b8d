"""Atomic file writes: a file is written to a temporary name in the same directory, flushed and fsynced, then
``os.replace``d over the target, so a process killed at any moment leaves either the old or the new file,
never a torn one.

Its own module, at the bottom of the package beside ``errors``: checkpoints, metrics, the run directory, the
evaluation report and the reproduce table all write this way, and none of them should have to import the
training engine to do it.
"""

from __future__ import annotations

import os
from pathlib import Path

from rslad_fast.errors import UserError

__all__ = ["WriteError", "atomic_write", "atomic_write_bytes"]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_error(e: BaseException):
    """The OSError behind ``e``: torch.save turns a failed write of its file object into a RuntimeError
    ("unexpected pos ...") raised while handling the OSError."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


class WriteError(UserError):
    """A file could not be written (disk full, read-only or unwritable folder); the old file is intact."""


def atomic_write(path, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then atomically replace ``path``.
    An OSError (ENOSPC, EROFS, ...) becomes one :class:`WriteError` naming the file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        cause = _os_error(e)
        if cause is None:
            raise
        raise WriteError(f"cannot write {path}: {cause.strerror or cause}") from None
    finally:
        try:
            tmp.unlink()
        except OSError:  # gone (replaced), or the folder is unwritable: a stale temporary is never read
            pass
    _fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))
