"""Wall time of each stage of an analysis, written beside its report (analysis/timings.json).

Stages nest (the loss barriers of a pair run inside that pair), so each second is counted in the
innermost stage only; on a GPU a stage ends with a synchronisation, so kernels still running are
counted in the stage that launched them, not the next. ``startup_s`` is the time from the start of
the process to the first model load: ``before_analysis_s`` (the interpreter, imports, the
arguments: process start to this timer's creation), then the stages before that load (reading
the run directory, loading and collating the data, waiting for checksums).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

logger = logging.getLogger(__name__)


def process_age() -> float | None:
    """Seconds since this process started (Linux: from /proc; None where that cannot be read)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            started_ticks = int(f.read().rpartition(")")[2].split()[19])  # field 22: starttime
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return uptime - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class StageTimer:
    """Accumulates wall seconds per named stage (see the module docstring)."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.startup_s: float | None = None
        self.before_analysis_s = process_age()
        self._started = time.perf_counter()
        self._nested: list[float] = []  # per open stage: the seconds of the stages nested in it

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def mark_startup(self) -> None:
        """Record the start-up time (once: at the first model load)."""
        if self.startup_s is None:
            self.startup_s = process_age()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Count the wall time of the block under ``name`` (minus that of stages nested in it)."""
        self._sync()
        start = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            self._sync()
            elapsed = time.perf_counter() - start
            inner = self._nested.pop()
            if self._nested:
                self._nested[-1] += elapsed
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - inner
            self.calls[name] = self.calls.get(name, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        total = time.perf_counter() - self._started
        stages = {name: {"seconds": s, "calls": self.calls[name]}
                  for name, s in sorted(self.seconds.items(), key=lambda item: -item[1])}
        slowest = next(iter(stages), None)
        return {"startup_s": self.startup_s, "before_analysis_s": self.before_analysis_s, "analysis_s": total,
                "stages": stages, "slowest_stage": slowest,
                "device": str(self.device) if self.device is not None else None}

    def log(self) -> None:
        parts = ", ".join(f"{name} {entry['seconds']:.1f} s" for name, entry in self.to_dict()["stages"].items())
        logger.info("Analysis stages (wall time): %s.", parts or "none (every pair reused)")
