"""Online divergence: a child's L2 distance to its parent at the same step.

The parent saves its parameters at the divergence steps (``ParentTrajectoryCallback``); each
child compares itself with those files as it passes the same steps (``DivergenceCallback``)
and appends ``{"step", "l2"}`` lines to ``divergence.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .atomic_io import save_tensors, write_jsonl
from .run_files import read_divergence
from .errors import ChildDivergedError, RunDirectoryError

logger = logging.getLogger(__name__)

LOG_KEY = "divergence/l2_to_parent"


def divergence_steps(spawn_step: int, max_steps: int, every: int) -> list[int]:
    """Steps after ``spawn_step`` at which a child is compared with its parent: every ``every``
    steps (none when 0) and always the final step."""
    steps = set(range(every * (spawn_step // every + 1), max_steps, every)) if every > 0 else set()
    steps.add(max_steps)
    return sorted(s for s in steps if s > spawn_step)


def named_floating_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.is_floating_point()}


def l2_to_file(model: nn.Module, path: str | Path) -> float:
    """L2 distance between the model's floating parameters and those saved in ``path``,
    accumulated in float64 on the parameters' device (one transfer of the result, not of the
    weights)."""
    return math.sqrt(float(squared_distance_to_file(named_floating_parameters(model), path)))


def squared_distance_to_file(params: dict[str, torch.Tensor], path: str | Path, stacked: bool = False) -> torch.Tensor:
    """Sum of squared differences, in float64, between ``params`` and the tensors of the same
    names in ``path``. ``stacked``: every tensor has a leading children dimension ``[K, *shape]``
    compared with the file's ``shape``; the result then has one value per child."""
    if not Path(path).is_file():
        raise RunDirectoryError(
            f"The parent's weights at this step ({path}) are gone: a finished study deletes parent/trajectory "
            "unless keep_parent_trajectory=True. To train children again, keep it, or re-run with --overwrite_run."
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


class ParentTrajectoryCallback(TrainerCallback):
    """Keeps the parent's parameters at the given steps for the children to compare with.

    Snapshots are held in CPU memory and written (main process only, to ``path_for(step)``)
    before every checkpoint save, at the end of training, and whenever more than
    ``max_buffer_bytes`` are held: disk writes stay out of ordinary training steps, and a
    checkpoint never exists without the snapshots of the steps before it.
    """

    def __init__(self, steps: Iterable[int], path_for: Callable[[int], Path], max_buffer_bytes: int = 2 << 30):
        self.steps = set(int(s) for s in steps)
        self.path_for = path_for
        self.max_buffer_bytes = max_buffer_bytes
        self._buffer: dict[int, dict[str, torch.Tensor]] = {}

    def flush(self) -> None:
        for step, params in sorted(self._buffer.items()):
            save_tensors(self.path_for(step), params, metadata={"step": str(step)})
        self._buffer.clear()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not state.is_world_process_zero:
            return
        if state.global_step in self.steps:
            params = named_floating_parameters(kwargs["model"])
            self._buffer[state.global_step] = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
        held = sum(t.numel() * t.element_size() for snap in self._buffer.values() for t in snap.values())
        if control.should_save or held > self.max_buffer_bytes:
            self.flush()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            self.flush()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            self.flush()


class DivergenceCallback(TrainerCallback):
    """Logs the child's L2 distance to the parent at ``steps`` (and right after the perturbation).

    The value goes to ``output_file`` (JSON lines) and, through ``pending_logs``, into the
    Trainer's own logs (``StabilityTrainer.log`` merges it), so every configured logger sees
    it. A NaN or Inf distance raises ``ChildDivergedError``. A child trained again after its
    study finished (a damaged child retrained alone) finds only the parent's snapshots that the
    study keeps (its spawn and last steps): the steps in between are left out of its record.
    """

    def __init__(
        self,
        spawn_step: int,
        steps: Iterable[int],
        path_for: Callable[[int], Path],
        output_file: str | Path,
    ):
        self.spawn_step = int(spawn_step)
        self.steps = set(int(s) for s in steps)
        self.path_for = path_for
        self.output_file = Path(output_file)
        self.log = DivergenceLog(self.output_file, self.spawn_step)
        self.pending_logs: dict[str, float] = {}

    def _record(self, state: TrainerState, model: nn.Module) -> float:
        l2 = l2_to_file(model, self.path_for(state.global_step))
        if state.is_world_process_zero:
            self.log.append(state.global_step, l2)
        if not math.isfinite(l2):
            raise ChildDivergedError(state.global_step, f"L2 distance to the parent is {l2}")
        return l2

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            self.log.start(state.global_step)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Right after the perturbation: the distance is the perturbation's own size.
        if state.global_step == self.spawn_step:
            self._record(state, kwargs["model"])

    def measured_at(self, step: int) -> bool:
        """Whether the child is compared with its parent at ``step``: a divergence step whose
        snapshot exists (the last step's must: its absence raises when measured)."""
        if step not in self.steps:
            return False
        if step == max(self.steps) or Path(self.path_for(step)).is_file():
            return True
        logger.info("The parent's snapshot at step %d is gone (a finished study keeps those of its spawn and last "
                    "steps): this child's divergence record leaves step %d out.", step, step)
        return False

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.measured_at(state.global_step):
            self.pending_logs[LOG_KEY] = self._record(state, kwargs["model"])
            control.should_log = True

    def complete_record(self, state: TrainerState, model: nn.Module) -> None:
        """For a run that is only loaded, already at its last step (``state.global_step``): the
        record ends at that step (measured now if the killed run had not written it)."""
        if state.is_world_process_zero:
            self.log.start(state.global_step)
        if self.log.last_step != state.global_step:
            self._record(state, model)

    def pop_logs(self) -> dict[str, Any]:
        logs, self.pending_logs = self.pending_logs, {}
        return logs
