"""Every callback of the training stage. Callbacks react to the Trainer's events and steer it only
through ``TrainerControl``; none holds a reference to the trainer. What they report flows through
objects they are given: a child's divergence into the trainer-owned ``divergence_logs`` dict
(StabilityMixin.log merges it into the Trainer's logs), a stacked child's NaN into a dict the
study reads.

- ``PerturbationCallback``: perturb any Trainer run once, at step t (public).
- ``SpawnCheckpointCallback``: the parent saves a Trainer checkpoint at every spawn step.
- ``ParentTrajectoryCallback``: the parent keeps its weights at the divergence steps.
- ``DivergenceCallback`` / ``StackedDivergenceCallback``: a child's (stacked children's) L2 to the parent.
- ``ChildLossCallback``: a stacked child whose loss became NaN or Inf is marked diverged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from ..atomic_io import save_tensors
from ..errors import ChildDivergedError, PerturbationConfigError, SpawnStepError
from ..perturb import PerturbationConfig, PerturbationKind, PerturbationRecord, make_generator, perturb_model
from .divergence import DivergenceLog, compared_parameters, l2_to_file, squared_distance_to_file

logger = logging.getLogger(__name__)

#: The key of a child's divergence in the Trainer's logs (TensorBoard, W&B, ...).
LOG_KEY = "divergence/l2_to_parent"


def _seedable_sampler(dataloader: Any) -> Any:
    """The sampler of a (possibly accelerate-prepared) dataloader that owns the shuffling seed."""
    seen = set()
    stack = [dataloader]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if hasattr(obj, "initial_seed") and hasattr(obj, "set_epoch"):
            return obj
        for attribute in ("batch_sampler", "sampler", "base_dataloader"):
            stack.append(getattr(obj, attribute, None))
    return None


def independent_batch(dataloader: Any, config: PerturbationConfig, step: int, child: int) -> dict[str, Any]:
    """A batch drawn with the perturbation's own generator from the training data (kind='batch')."""
    dataset = getattr(dataloader, "dataset", None)
    collate = getattr(dataloader, "collate_fn", None)
    if dataset is None or collate is None or not hasattr(dataset, "__len__"):
        raise PerturbationConfigError(
            "kind='batch' needs a map-style training dataset to draw its batch from; this Trainer's "
            "train dataloader has none (an IterableDataset?). Use kind='gaussian' instead."
        )
    generator = make_generator(config.seed, step, child, stream=2)
    size = min(config.batch_size, len(dataset))
    indices = torch.randperm(len(dataset), generator=generator)[:size].tolist()
    return collate([dataset[i] for i in indices])


class PerturbationCallback(TrainerCallback, ExportableState):
    """Perturbs the model once, when training reaches ``at_step`` optimizer steps.

    Weight kinds (``gaussian``, ``batch``) change the weights just before optimizer step
    ``at_step + 1``; ``dropout`` reseeds torch's RNG there; ``data_order`` gives the data
    sampler another seed and must start where training starts or resumes (resume from
    ``checkpoint-<at_step>``); ``init_seed`` (at step 0 only) replaces the weights with those
    ``model_init`` (the Trainer's) builds under another seed. Every rank draws the identical
    perturbation. The record is kept in ``self.record`` and, when ``record_path`` is given,
    written there by the main process.

    Example::

        trainer = Trainer(model, args, train_dataset=ds,
                          callbacks=[PerturbationCallback(PerturbationConfig(scale=0.01), at_step=100)])
    """

    def __init__(
        self,
        config: PerturbationConfig | dict[str, Any],
        at_step: int,
        child: int = 0,
        record_path: str | Path | None = None,
        model_init: Callable[[], nn.Module] | None = None,
    ):
        self.config = config if isinstance(config, PerturbationConfig) else PerturbationConfig.from_dict(config)
        if int(at_step) < 0:
            raise SpawnStepError(f"at_step must be >= 0, got {at_step}.")
        if self.config.kind == PerturbationKind.INIT_SEED and int(at_step) != 0:
            raise SpawnStepError(f"kind='init_seed' is another initialisation: it happens at step 0, not {at_step}.")
        self.model_init = model_init
        self.at_step = int(at_step)
        self.child = int(child)
        self.record_path = str(record_path) if record_path is not None else None
        self.applied = False
        self.record_data: dict[str, Any] | None = None

    @property
    def record(self) -> PerturbationRecord | None:
        """What the perturbation changed, once applied."""
        return PerturbationRecord.from_dict(self.record_data) if self.record_data is not None else None

    # ExportableState: carried through trainer_state.json across a resume.
    def state(self) -> dict[str, Any]:
        return {
            "args": {
                "config": self.config.to_dict(),
                "at_step": self.at_step,
                "child": self.child,
                "record_path": self.record_path,
            },
            "attributes": {"applied": self.applied, "record_data": self.record_data},
        }

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # A resumed TrainerState may come from a checkpoint made without this callback: give it an
        # entry, or the Trainer fails on its next save.
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        if state.max_steps and self.at_step >= state.max_steps:
            raise SpawnStepError(
                f"PerturbationCallback at_step={self.at_step} is at or beyond the last step ({state.max_steps}): "
                f"choose a step in [0, {state.max_steps - 1}]."
            )
        if self.applied:
            return
        if state.global_step > self.at_step:
            logger.warning(
                "Training starts at step %d, past the perturbation step %d, and the perturbation was never "
                "applied: this run is unperturbed.",
                state.global_step,
                self.at_step,
            )
            return
        if self.config.kind == PerturbationKind.DATA_ORDER:
            if state.global_step != self.at_step:
                raise PerturbationConfigError(
                    f"kind='data_order' must start where training starts or resumes: training starts at step "
                    f"{state.global_step}, the perturbation is at step {self.at_step}. Resume from "
                    f"checkpoint-{self.at_step} (StabilityTrainer.butterfly does this)."
                )
            sampler = _seedable_sampler(kwargs.get("train_dataloader"))
            if sampler is None:
                raise PerturbationConfigError(
                    "kind='data_order' needs accelerate's seedable sampler: keep "
                    "accelerator_config.use_seedable_sampler=True and a map-style, shuffled train dataset."
                )
            self._apply(args, state, kwargs.get("model"), kwargs.get("train_dataloader"))
            sampler.initial_seed = self.record.reseed

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.applied or state.global_step != self.at_step:
            return
        self._apply(args, state, kwargs.get("model"), kwargs.get("train_dataloader"))
        if self.config.kind == PerturbationKind.DROPOUT:
            torch.manual_seed(self.record.reseed)  # seeds CPU and every CUDA device

    def _apply(self, args: TrainingArguments, state: TrainerState, model: Any, dataloader: Any) -> None:
        batch = None
        if self.config.kind == PerturbationKind.BATCH and self.config.changes_weights:
            batch = independent_batch(dataloader, self.config, self.at_step, self.child)
        record = perturb_model(model, self.config, step=self.at_step, child=self.child, batch=batch,
                               model_init=self.model_init)
        self.record_data = record.to_dict()
        self.applied = True
        logger.info(
            "Applied %s perturbation at step %d (child %d): %d entries, L2 %.6g",
            self.config.kind,
            self.at_step,
            self.child,
            record.entries_changed,
            record.change_l2,
        )
        if self.record_path is not None and state.is_world_process_zero:
            record.save(self.record_path)


class ParentTrajectoryCallback(TrainerCallback):
    """Keeps the parent's parameters at the given steps for the children to compare with.

    Snapshots are held in CPU memory and written (main process only, to ``path_for(step)``)
    before every checkpoint save, at the end of training, and whenever more than
    ``max_buffer_bytes`` are held: disk writes stay out of ordinary training steps, and a
    checkpoint never exists without the snapshots of the steps before it.
    """

    def __init__(self, steps: Iterable[int], path_for: Callable[[int], Path], max_buffer_bytes: int = 2 << 30,
                 trainable_only: bool = True):
        self.steps = set(int(s) for s in steps)
        self.trainable_only = trainable_only
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
            params = compared_parameters(kwargs["model"], self.trainable_only)
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


class SpawnCheckpointCallback(TrainerCallback):
    """Makes the parent save a Trainer checkpoint at every spawn step after 0 (the checkpoint at
    step 0, before the first optimizer step, is StabilityMixin's: no event comes at that point
    with the means to save one)."""

    def __init__(self, steps: Iterable[int]):
        self.steps = set(int(s) for s in steps)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.global_step in self.steps:
            control.should_save = True


class DivergenceCallback(TrainerCallback):
    """Logs the child's L2 distance to the parent at ``steps`` (and right after the perturbation).

    The value goes to ``output_file`` (JSON lines) and into ``logs``, the trainer's
    ``divergence_logs``, which StabilityMixin.log merges into the Trainer's own logs, so every
    configured logger sees it. A NaN or Inf distance raises ``ChildDivergedError``. A child
    trained again after its study finished (a damaged child retrained alone) finds only the
    parent's snapshots that the study keeps (its spawn and last steps): the steps in between are
    left out of its record.
    """

    def __init__(
        self,
        spawn_step: int,
        steps: Iterable[int],
        path_for: Callable[[int], Path],
        output_file: str | Path,
        logs: dict[str, float] | None = None,
        trainable_only: bool = True,
    ):
        self.spawn_step = int(spawn_step)
        self.steps = set(int(s) for s in steps)
        self.path_for = path_for
        self.output_file = Path(output_file)
        self.log = DivergenceLog(self.output_file, self.spawn_step)
        self.logs = logs if logs is not None else {}  # the trainer's divergence_logs
        self.trainable_only = trainable_only

    def _record(self, state: TrainerState, model: nn.Module) -> float:
        l2 = l2_to_file(model, self.path_for(state.global_step), self.trainable_only)
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
            self.logs[LOG_KEY] = self._record(state, kwargs["model"])
            control.should_log = True

    def complete_record(self, state: TrainerState, model: nn.Module) -> None:
        """For a run that is only loaded, already at its last step (``state.global_step``): the
        record ends at that step (measured now if the killed run had not written it)."""
        if state.is_world_process_zero:
            self.log.start(state.global_step)
        if self.log.last_step != state.global_step:
            self._record(state, model)


class StackedDivergenceCallback(DivergenceCallback):
    """Divergence of every child of a stacked run: at each divergence step the parent's file is
    read once and compared with all K children on their device. Logged as
    ``divergence/l2_to_parent/c<k>`` and written to the files of ``output_files`` (child -> its
    divergence.jsonl; a child already finished by an earlier, killed run has none). A NaN or Inf
    distance marks that child in ``diverged`` instead of stopping its siblings."""

    def __init__(self, children: list[int], diverged: dict[int, dict[str, Any]], output_files: dict[int, Path],
                 **kwargs: Any):
        super().__init__(output_file=next(iter(output_files.values())), **kwargs)
        self.children, self.diverged = children, diverged
        self.child_logs = {child: DivergenceLog(path, self.spawn_step) for child, path in output_files.items()}

    def _record(self, state: TrainerState, model: nn.Module) -> list[float]:
        values = squared_distance_to_file(model.stacked_parameters(), self.path_for(state.global_step),
                                          stacked=True).sqrt().tolist()
        for child, l2 in zip(self.children, values):
            if child in self.diverged:
                continue
            if state.is_world_process_zero and child in self.child_logs:
                self.child_logs[child].append(state.global_step, l2)
            if not math.isfinite(l2):
                self.diverged[child] = {"step": state.global_step, "reason": f"L2 distance to the parent is {l2}"}
        return values

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            for log in self.child_logs.values():
                log.start(state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.measured_at(state.global_step):
            for child, l2 in zip(self.children, self._record(state, kwargs["model"])):
                if child not in self.diverged or self.diverged[child]["step"] == state.global_step:
                    self.logs[f"{LOG_KEY}/c{child}"] = l2
            control.should_log = True


class ChildLossCallback(TrainerCallback):
    """Marks a child diverged at the first step whose training loss is NaN or Inf.

    The check stays on the device, so that no step waits for the GPU: the first bad step and
    loss of each child are kept there and read into ``diverged`` at ``sync_steps`` (the steps
    whose divergence is measured, which read ``diverged`` next), at each logged step and at the
    end of training; a child's siblings never depend on it in between (their slices are their own)."""

    def __init__(self, children: list[int], diverged: dict[int, dict[str, Any]], sync_steps: Iterable[int] = ()):
        self.children, self.diverged = children, diverged
        self.sync_steps = set(int(s) for s in sync_steps)
        self._first_bad: torch.Tensor | None = None  # [K] step of the first non-finite loss (-1: none yet)
        self._bad_loss: torch.Tensor | None = None  # [K] that loss

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        losses = kwargs["model"].last_losses
        if losses is None:
            return
        if self._first_bad is None:
            self._first_bad = torch.full(losses.shape, -1, dtype=torch.long, device=losses.device)
            self._bad_loss = torch.zeros(losses.shape, dtype=torch.float32, device=losses.device)
        new = ~torch.isfinite(losses) & (self._first_bad < 0)
        self._first_bad = torch.where(new, state.global_step, self._first_bad)
        self._bad_loss = torch.where(new, losses.float(), self._bad_loss)
        if control.should_log or state.global_step in self.sync_steps or state.global_step >= state.max_steps:
            self.collect()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.collect()

    def collect(self) -> None:
        """Read the device's record of bad losses into ``diverged`` (one wait for the device)."""
        if self._first_bad is None:
            return
        for child, step, value in zip(self.children, self._first_bad.tolist(), self._bad_loss.tolist()):
            if step >= 0 and child not in self.diverged:
                self.diverged[child] = {"step": step, "reason": f"training loss is {value}"}
                logger.warning("Child %d diverged at step %d (loss %s); its siblings go on.", child, step, value)
