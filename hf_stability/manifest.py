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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .atomic_io import write_json
from .errors import RunDirectoryError
from .run_files import read_json

MANIFEST_FORMAT = 1
_CHUNK = 8 << 20
#: Files of at least this size (model weights, arrow files) may have their checksum compared later
#: (``verify(..., later=...)``); their size is checked at once.
LATER_BYTES = 1 << 20


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


class BackgroundDigests:
    """The sha256 of ``paths`` computed in background threads, in the order given (hashing and
    reading release the GIL): checking a study's every model is then bounded by the disk, not by
    one core, and the first files are ready first while the rest are still being read.
    ``digest(path)`` waits for that file only; a file that changed since it was hashed (size or
    mtime) is hashed again. ``close()`` stops what has not started."""

    def __init__(self, paths: list[Path], workers: int | None = None):
        self._pool = ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1),
                                        thread_name_prefix="sha256")
        self._ahead: dict[Path, tuple[tuple[int, int], Future[str]]] = {}
        for path in dict.fromkeys(paths):
            self._ahead[path] = (_stamp(path), self._pool.submit(sha256_of, path))

    def digest(self, path: Path) -> str:
        ahead = self._ahead.get(path)
        if ahead is not None and ahead[0] == _stamp(path):
            try:
                return ahead[1].result()
            except OSError:
                pass  # read again below, where the error is raised in the caller's thread
        return sha256_of(path)

    def ready(self, path: Path) -> bool:
        """Whether ``digest(path)`` returns without waiting for a file still being hashed."""
        ahead = self._ahead.get(path)
        return ahead is not None and ahead[1].done()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


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


@dataclass(frozen=True)
class ChecksumCheck:
    """One file's comparison with the sha256 its manifest recorded, to run when its bytes are needed."""

    file: Path
    manifest: Path
    sha256: str
    remedy: str

    def run(self, digests: BackgroundDigests | None = None) -> None:
        """Raises: RunDirectoryError: the file's sha256 is not the recorded one."""
        digest = digests.digest(self.file) if digests is not None else sha256_of(self.file)
        if digest != self.sha256:
            raise RunDirectoryError(
                f"{self.file} does not match the checksum its run recorded (sha256 {digest[:12]}..., recorded "
                f"{self.sha256[:12]}...): the file was damaged after its run finished. {self.remedy}",
                path=self.file,
            )


def verify(path: Path, base: Path, remedy_for: Callable[[str], str],
           only: Callable[[str], bool] = lambda name: True,
           later: list[ChecksumCheck] | None = None, digests: BackgroundDigests | None = None) -> dict[str, str]:
    """Check every file of the manifest ``path`` that ``only(name)`` selects against its recorded
    size and sha256; returns name -> sha256. ``remedy_for(name)`` is the narrowest remedy for a
    damaged file of that name; ``digests`` the checksums computed ahead. With ``later``, the
    checksums of files of ``LATER_BYTES`` or more are not compared now but appended to it as
    ``ChecksumCheck``s (the caller runs each before the file's bytes are used, and all before a
    result is written); their sizes are checked now.

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
        check = ChecksumCheck(file, path, entry["sha256"], remedy_for(name))
        if later is not None and size >= LATER_BYTES:
            later.append(check)
        else:
            check.run(digests)
        checked[name] = entry["sha256"]  # what the file holds once its check passes
    return checked
