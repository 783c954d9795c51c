"""Atomic file writes: a killed process never leaves a half file that looks complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import DiskFullError, HfStabilityError

#: What libraries say when a write hits a full disk: errno numbers, and the messages of torch.save
#: (a RuntimeError from its stream writer) and safetensors (a SafetensorError), which keep no OSError.
_DISK_FULL_ERRNOS = (28, 27, 122)  # ENOSPC, EFBIG, EDQUOT
_DISK_FULL_WORDS = ("no space left on device", "file too large", "disk quota exceeded", "file write failed",
                    "os error 28", "os error 27", "os error 122", "iostream error", "unexpected pos")


def disk_full_error(error: BaseException, target: object) -> DiskFullError | None:
    """A DiskFullError saying what to do when writing ``target`` failed on a full disk; None when
    ``error`` is something else."""
    reason = disk_full_reason(error)
    if reason is None:
        return None
    return DiskFullError(
        f"Writing {target} failed: the disk is full or failing ({reason}). Free space (or choose another "
        "output_dir) and run the same command again: nothing half-written is taken as complete, and a study "
        "resumes from its last complete checkpoint.",
        path=str(target),
    )


def disk_full_reason(error: BaseException) -> str | None:
    """The message of the full-disk failure in ``error``'s chain of causes, or None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return error.strerror or str(error)
        if any(word in str(error).lower() for word in _DISK_FULL_WORDS):
            return str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        error = error.__cause__ or error.__context__
    return None


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


@contextmanager
def disk_full_as_error(target: object) -> Iterator[None]:
    """A write in the block that fails on a full disk raises a DiskFullError naming ``target``;
    every other error passes unchanged."""
    try:
        yield
    except HfStabilityError:
        raise
    except Exception as err:
        full = disk_full_error(err, target)
        if full is None:
            raise
        raise full from err


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with disk_full_as_error(path):
            yield tmp_path
            os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; results are meant to be read by others
            os.replace(tmp_path, path)
            _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False, allow_nan=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as JSON lines, atomically (used to rewrite a log after a resume)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())


def save_tensors(path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Save a flat dict of tensors as safetensors, atomically."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(cpu, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; move it onto ``path`` only if the block succeeds.

    ``path`` must not exist yet: a complete directory is never replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(directory: str | os.PathLike) -> None:
    """Delete the ``.*.tmp`` leftovers of writers that were killed."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in directory.glob(".*.tmp"):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
