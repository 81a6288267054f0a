"""Writing files so that a crash at any instant leaves either the old file or the new one, whole.

Every file vitlab writes (checkpoints, caches, exports, configs, reports) goes through
`atomic_write`: the bytes go to a temporary file beside the target, are flushed to disk (fsync), and
the temporary file is renamed over the target (atomic on POSIX); the directory is synced too, so
the rename itself survives a power cut. A failed write (disk full, no permission) is a VitlabError
that says what, where and how much space was free, and leaves the previous file untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from vitlab.errors import VitlabError


def free_space(path: Path) -> str:
    """The free space of the file system holding path (or its nearest existing parent), readable."""
    for candidate in [path, *path.parents]:
        if candidate.exists():
            free = shutil.disk_usage(candidate).free
            return f"{free / 2**20:.1f} MiB free" if free < 2**30 else f"{free / 2**30:.1f} GiB free"
    return "free space unknown"


@contextlib.contextmanager
def atomic_open(path: Path | str, what: str = "file") -> Iterator[BinaryIO]:
    """Open a temporary binary file beside `path`; on leaving the block without error it replaces
    `path` atomically. `what` names the file in errors ("checkpoint", "decode cache", ...)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise VitlabError(f"cannot write {what} {path}: {e.strerror or e} ({free_space(path)})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
        sync_directory(path.parent)
    except OSError as e:
        Path(temp).unlink(missing_ok=True)
        raise VitlabError(f"cannot write {what} {path}: {e.strerror or e} ({free_space(path)}); "
                          f"the previous {what}, if any, is unchanged") from None
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path | str, data: bytes | str | Callable[[BinaryIO], None], what: str = "file"):
    """Write `data` (bytes, text, or a function that writes to a binary file) to `path` atomically."""
    with atomic_open(path, what) as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode() if isinstance(data, str) else data)


def sync_directory(directory: Path):
    """fsync a directory so that a rename in it is durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
