"""One writer per run directory: an exclusive lock that the operating system releases when the
process that holds it ends, however it ends (SIGKILL included), so a killed study never leaves
its run directory locked.

``butterfly()``, ``analyze``, ``report`` and ``push`` hold it for their whole work. A second
process on the same run directory gets ``RunInUseError`` naming the holder's pid, instead of the
two racing (a loser dying on a file the winner renamed, duplicated divergence lines, a stale
``.final.tmp``). The lock is an ``flock`` on ``RUN/.hf_stability.lock``; the file keeps the
holder's pid, command and start time for that message. Inside one process the lock is
re-entrant (a recipe's analysis after its training, a card written during a push).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from .errors import RunInUseError

logger = logging.getLogger(__name__)

try:  # POSIX; elsewhere runs are not locked (logged once)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_held: set[str] = set()  # resolved lock paths this process holds
_guard = threading.Lock()


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


@contextmanager
def locked_run(root: str | os.PathLike, command: str, create: bool = False) -> Iterator[None]:
    """Hold the run directory ``root``'s lock inside the block (``command`` names what holds it).
    ``create``: make ``root`` if it does not exist (a study starting); otherwise a missing or
    read-only run directory is not locked (the caller's own checks say what is wrong with it).

    Raises:
        RunInUseError: another process holds the lock (its pid is in the error).
    """
    from .run_directory import LOCK_NAME

    root = Path(root)
    if create:
        root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    key = str(path.resolve())
    with _guard:
        reentered = key in _held
    if reentered:  # this process holds it already, further up the stack
        yield
        return
    if fcntl is None:  # pragma: no cover
        logger.warning("File locks are not available here: nothing stops a second process from writing %s.", root)
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:  # no such folder, or a read-only one: nobody can write it through us either
        logger.debug("%s is not locked (%s).", root, err)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = _holder(path)
        pid = holder.get("pid")
        raise RunInUseError(
            f"{root} is in use by another hf_stability process (pid {pid if pid is not None else 'unknown'}, "
            f"`{holder.get('command', 'unknown command')}` on {holder.get('host', 'an unknown host')} since "
            f"{holder.get('since', 'an unknown time')}). Two processes writing one run directory would corrupt "
            "it: wait for that one to finish, or stop it, then run this again (the lock goes with its process).",
            path=root, pid=pid,
        ) from None
    try:
        os.ftruncate(fd, 0)
        record = {"pid": os.getpid(), "command": command, "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.write(fd, (json.dumps(record) + "\n").encode())
    except OSError:
        pass  # the lock holds without the note
    with _guard:
        _held.add(key)
    try:
        yield
    finally:
        with _guard:
            _held.discard(key)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextmanager
def locked_run_on_main(
    root: str | os.PathLike, command: str, accelerator: object = None, create: bool = False
) -> Iterator[None]:
    """``locked_run`` taken by the main process of an ``accelerate`` launch (``accelerator``; None:
    one process) for all of them: when another process holds the lock, every process raises.

    Raises:
        RunInUseError: another process holds the lock.
    """
    main = accelerator is None or accelerator.is_main_process
    several = accelerator is not None and accelerator.num_processes > 1
    held = ExitStack()
    failure: RunInUseError | None = None
    if main:
        try:
            held.enter_context(locked_run(root, command, create))
        except RunInUseError as err:
            failure = err
    if several:
        from accelerate.utils import broadcast_object_list

        failure = broadcast_object_list([failure], from_process=0)[0]
    if failure is not None:
        raise failure
    with held:
        yield
