"""A torch.profiler table of a block of work, written beside a benchmark's JSON."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def device_name() -> str:
    """The GPU's name, or "cpu"."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_profile(work: Callable[[], None], path: str | Path, title: str, rows: int = 30) -> None:
    """Profile one call of ``work`` (CPU and, where present, CUDA activity) and write the table of
    the ``rows`` operators that take the most device time (CPU time without a GPU)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        work()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=70)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(f"{title}\n\n{table}\n", encoding="utf-8")
