"""Files that survive crashes and run no code when read.

Writing: a crash at any instant leaves either the old file or the new one, whole.

Every file vitlab writes (checkpoints, caches, exports, configs, reports) goes through
`atomic_write`: the bytes go to a temporary file beside the target, are flushed to disk (fsync), and
the temporary file is renamed over the target (atomic on POSIX); the directory is synced too, so
the rename itself survives a power cut. A failed write (disk full, no permission) is a VitlabError
that says what, where and how much space was free, and leaves the previous file untouched.

Checkpoints are written and read here, and nowhere else: `write_checkpoint` (atomic, stamped with the
format, never non-finite weights) and `read_checkpoint`, which loads with weights_only (no pickled
code runs) and says exactly what is wrong with a file that is not a checkpoint vitlab can read.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import os
import pickle
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import torch

from vitlab.errors import VitlabError

try:
    VERSION = version("vitlab")  # stamped into every checkpoint
except PackageNotFoundError:  # run from a source tree that was not installed
    VERSION = "unknown"

# Bumped when a checkpoint's layout changes in a way older vitlab versions cannot read.
CHECKPOINT_FORMAT = 1
HPARAMS_KEYS = {"model", "class_names", "image_mean", "image_std"}


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


@contextlib.contextmanager
def made_by_one(path: Path, what: str = "file") -> Iterator[None]:
    """Hold an exclusive lock (a `.lock` file beside `path`) while making `path`: processes that
    need the same file at once (DDP ranks, two runs on one new folder) make it once; the others
    wait, then find it made."""
    lock = path.with_name(path.name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a")
    except OSError as e:
        raise VitlabError(f"cannot lock {what} {path}: {e.strerror or e}") from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


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


def non_finite_tensors(state: dict) -> list[str]:
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]


def write_checkpoint(checkpoint: dict, path: Path | str):
    """Write a training checkpoint atomically and durably, stamped with vitlab's version and
    checkpoint format; weights that are not finite are refused (a diverged run never overwrites a
    good checkpoint)."""
    bad = non_finite_tensors(checkpoint["state_dict"])
    if bad:
        raise VitlabError(f"refused to write checkpoint {path}: weights are not finite ({bad[0]}, ...); "
                          f"training diverged (try a lower optim.lr or trainer.gradient_clip)")
    checkpoint["vitlab"] = {"version": VERSION, "format": CHECKPOINT_FORMAT}
    with atomic_open(path, "checkpoint") as f:
        torch.save(checkpoint, f)


def read_checkpoint(path: Path) -> dict:
    """A checkpoint written by vitlab, loaded without running code, or a one-line error saying why not."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise VitlabError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise VitlabError(f"refused to load {path}: it holds objects that would run code when loaded "
                              f"(vitlab loads checkpoints with weights_only); do not trust this file") from None
        raise VitlabError(f"{path} is not a vitlab checkpoint (damaged or not a checkpoint)") from None
    except Exception:  # torch raises many kinds for files that are not zip/pickle archives
        raise VitlabError(f"{path} is not a vitlab checkpoint (damaged or not a checkpoint)") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not HPARAMS_KEYS <= set(hparams) or "state_dict" not in checkpoint:
        raise VitlabError(f"{path} is not a vitlab checkpoint (no vitlab model config or weights in it)")
    found = checkpoint.get("vitlab", {}).get("format", 0)
    if found > CHECKPOINT_FORMAT:
        raise VitlabError(f"{path} was written by a newer vitlab ({checkpoint['vitlab'].get('version')}, "
                          f"checkpoint format {found}; this vitlab reads up to {CHECKPOINT_FORMAT}): "
                          f"upgrade vitlab")
    return checkpoint


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file (whose loading runs no code), or a one-line error."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise VitlabError(f"{path} is not a safetensors file ({e})") from None


def metric_columns(path: Path) -> list[str]:
    """The header of a metrics.csv file."""
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def read_metric_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of RUN_DIR/metrics.csv as written (empty strings where a value is missing); [] if none."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
