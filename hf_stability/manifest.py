"""Checksums of the files a run wrote, recorded once the run is complete and verified whenever
they are read back, so that a damaged file (truncated, bytes flipped by a copy or a disk) is
named with what to do instead of becoming wrong numbers.

A manifest is a JSON object ``{"format": 1, "fingerprint": <the run's>, "files": {name:
{"sha256", "bytes"}}}``; names are relative to the manifest's base folder (a run's own folder:
``parent/``, ``children/t<t>/c<k>/``, ``data/``). It is written atomically, and a run's
``final/manifest.json`` is written inside ``.final.tmp`` before the rename, so a finished run
always has one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path, PurePosixPath

from .atomic_io import write_json
from .errors import RunDirectoryError
from .run_files import read_json

MANIFEST_FORMAT = 1
_CHUNK = 8 << 20


#: Checksums computed ahead of ``verify`` (``digests_ahead``), by path and (size, mtime) when computed.
_AHEAD: ContextVar[dict[Path, tuple[tuple[int, int], str]] | None] = ContextVar("digests_ahead", default=None)


def sha256_of(path: Path) -> str:
    """The sha256 of a file's bytes, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@contextmanager
def digests_ahead(paths: list[Path], workers: int | None = None) -> Iterator[None]:
    """Compute the sha256 of ``paths`` in threads (hashing and reading release the GIL), for the
    ``verify`` calls inside the block: checking a study's every model is then bounded by the
    disk, not by one core. A file that changed since (size or mtime) is hashed again."""
    workers = workers or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        stamps = {path: _stamp(path) for path in paths}
        found = dict(zip(paths, pool.map(sha256_of, paths)))
    token = _AHEAD.set({path: (stamps[path], found[path]) for path in paths})
    try:
        yield
    finally:
        _AHEAD.reset(token)


def _digest(file: Path) -> str:
    ahead = (_AHEAD.get() or {}).get(file)
    if ahead is not None and ahead[0] == _stamp(file):
        return ahead[1]
    return sha256_of(file)


def files_under(folder: Path) -> list[Path]:
    """Every regular file below ``folder``, sorted (temporaries and manifests excluded)."""
    from .run_directory import MANIFEST_NAME

    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and p.name != MANIFEST_NAME
                  and not (p.name.startswith(".") and p.name.endswith(".tmp")))


def write_manifest(path: Path, files: dict[str, Path], fingerprint: str | None) -> None:
    """Record the sha256 and size of ``files`` (the name each will be verified under, relative to
    the manifest's base folder -> where the file is now) in the manifest ``path``."""
    entries = {name: {"sha256": sha256_of(file), "bytes": file.stat().st_size} for name, file in sorted(files.items())}
    write_json(path, {"format": MANIFEST_FORMAT, "fingerprint": fingerprint, "files": entries})


def named_files(folder: Path, prefix: str) -> dict[str, Path]:
    """The files below ``folder`` by the names they have under ``prefix`` (``prefix/relative``)."""
    return {f"{prefix}/{PurePosixPath(p.relative_to(folder)).as_posix()}".lstrip("/"): p for p in files_under(folder)}


def read_manifest(path: Path, remedy: str) -> dict:
    """A manifest, checked for shape (a crafted one cannot name a file outside its base)."""
    manifest = read_json(path, remedy)
    files = manifest.get("files")
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
        raise RunDirectoryError(f"{path} is no manifest of format {MANIFEST_FORMAT}: the file is damaged. {remedy}",
                                path=path)
    for name, entry in files.items():
        parts = PurePosixPath(name).parts
        if PurePosixPath(name).is_absolute() or ".." in parts or not isinstance(entry, dict) \
                or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("bytes"), int):
            raise RunDirectoryError(f"{path} has a bad entry {name!r}: the file is damaged. {remedy}", path=path)
    return manifest


def verify(path: Path, base: Path, remedy_for: Callable[[str], str],
           only: Callable[[str], bool] = lambda name: True) -> dict[str, str]:
    """Check every file of the manifest ``path`` that ``only(name)`` selects against its recorded
    size and sha256; returns name -> sha256. ``remedy_for(name)`` is the narrowest remedy for a
    damaged file of that name.

    Raises:
        RunDirectoryError: a file is missing, or its size or checksum differs from the record.
    """
    manifest = read_manifest(path, remedy_for(path.name))
    checked = {}
    for name, entry in manifest["files"].items():
        if not only(name):
            continue
        file = base / name
        if not file.is_file():
            raise RunDirectoryError(f"{file} is missing (its run recorded it in {path}). {remedy_for(name)}", path=file)
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise RunDirectoryError(
                f"{file} has {size} bytes, {entry['bytes']} were written: the file was truncated or replaced after "
                f"its run finished. {remedy_for(name)}", path=file,
            )
        digest = _digest(file)
        if digest != entry["sha256"]:
            raise RunDirectoryError(
                f"{file} does not match the checksum its run recorded (sha256 {digest[:12]}..., recorded "
                f"{entry['sha256'][:12]}...): the file was damaged after its run finished. {remedy_for(name)}",
                path=file,
            )
        checked[name] = digest
    return checked
