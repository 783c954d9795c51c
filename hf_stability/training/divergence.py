"""Online divergence: a child's L2 distance to its parent at the same step.

The parent saves its parameters at the divergence steps (``ParentTrajectoryCallback``); each
child compares itself with those files as it passes the same steps (``DivergenceCallback``)
and appends ``{"step", "l2"}`` lines to its ``divergence.jsonl`` (``DivergenceLog``). This
module holds the measure and the log; the callbacks are in callbacks.py.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..atomic_io import write_jsonl
from ..errors import RunDirectoryError
from ..hints import setting
from ..run_files import read_divergence

logger = logging.getLogger(__name__)

LOG_KEY = "divergence/l2_to_parent"


def divergence_steps(spawn_step: int, max_steps: int, every: int) -> list[int]:
    """Steps after ``spawn_step`` at which a child is compared with its parent: every ``every``
    steps (none when 0) and always the final step."""
    steps = set(range(every * (spawn_step // every + 1), max_steps, every)) if every > 0 else set()
    steps.add(max_steps)
    return sorted(s for s in steps if s > spawn_step)


def compared_parameters(model: nn.Module, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """The floating parameters in which a child can differ from its parent: those that train
    (``trainable_only``, the default of perturbations: a frozen weight, a PEFT model's base, stays
    the parent's), or all of them."""
    return {name: p for name, p in model.named_parameters()
            if p.is_floating_point() and (p.requires_grad or not trainable_only)}


def l2_to_file(model: nn.Module, path: str | Path, trainable_only: bool = True) -> float:
    """L2 distance between the model's compared parameters and those saved in ``path``,
    accumulated in float64 on the parameters' device (one transfer of the result, not of the
    weights)."""
    return math.sqrt(float(squared_distance_to_file(compared_parameters(model, trainable_only), path)))


def squared_distance_to_file(params: dict[str, torch.Tensor], path: str | Path, stacked: bool = False) -> torch.Tensor:
    """Sum of squared differences, in float64, between ``params`` and the tensors of the same
    names in ``path``. ``stacked``: every tensor has a leading children dimension ``[K, *shape]``
    compared with the file's ``shape``; the result then has one value per child."""
    if not Path(path).is_file():
        raise RunDirectoryError(
            f"The parent's weights at this step ({path}) are gone: a finished study keeps only those of its spawn "
            "steps and its last step (all of them with keep_parent_trajectory=True). Restore the file from a copy of "
            f"the run, or run the study again with {setting('overwrite_run')}.", path=path,
        )
    total: torch.Tensor | None = None
    with torch.no_grad(), safe_open(str(path), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        missing = [name for name in params if name not in keys]
        if missing:
            raise RunDirectoryError(
                f"{path} has no tensor {missing[0]!r}: the parent and child models differ. "
                "Train the children with the parent's architecture."
            )
        for name, p in params.items():
            device = p.device if p.device.type in ("cpu", "cuda") else torch.device("cpu")  # float64 support
            ref = f.get_tensor(name).to(device, torch.float64)
            diff = p.detach().to(device, torch.float64) - ref
            part = diff.pow(2).reshape(diff.shape[0], -1).sum(1) if stacked else diff.pow(2).sum()
            total = part if total is None else total + part.to(total.device)
    if total is None:
        return torch.zeros((), dtype=torch.float64)
    return total.cpu()


def _resumed_record(path: Path) -> list[dict[str, Any]]:
    """The record of a child that is (re)starting: a torn last line is a killed writer's and is
    dropped; any other bad line is damage, and stops the child."""
    return read_divergence(path, f"Delete {Path(path).parent} and run the study again: that child trains again from "
                           "its spawn checkpoint.", finished=False)


def drop_lines_after(output_file: Path, step: int, spawn_step: int) -> int | None:
    """After a resume at ``step``, drop the divergence lines written past it: they are computed
    again (the spawn step's own line too, when training restarts at the spawn step). Returns the
    last step left in the file (None: it is empty)."""
    kept = [
        row
        for row in _resumed_record(output_file)
        if row["step"] < step or (row["step"] == step and step != spawn_step)
    ]
    write_jsonl(output_file, kept)
    return kept[-1]["step"] if kept else None


class DivergenceLog:
    """A child's ``divergence.jsonl``, appended one ``{"step", "l2"}`` line at a time in
    increasing steps. ``start(step)`` cuts it back to where a (resumed) run starts; a step at or
    before the last one written is never appended twice: the lines from it on are replaced."""

    def __init__(self, path: Path, spawn_step: int):
        self.path, self.spawn_step = Path(path), int(spawn_step)
        self.last_step: int | None = None

    def start(self, step: int) -> None:
        self.last_step = drop_lines_after(self.path, step, self.spawn_step)

    def append(self, step: int, l2: float) -> None:
        if self.last_step is not None and step <= self.last_step:
            write_jsonl(self.path, [row for row in _resumed_record(self.path) if row["step"] < step])
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "l2": l2}) + "\n")
        self.last_step = step
