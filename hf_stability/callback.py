"""PerturbationCallback: apply a perturbation at step t inside any transformers.Trainer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from .errors import PerturbationConfigError, SpawnStepError
from .perturb import PerturbationConfig, PerturbationRecord, make_generator, perturb_model

logger = logging.getLogger(__name__)


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


def _independent_batch(dataloader: Any, config: PerturbationConfig, step: int, child: int) -> dict[str, Any]:
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
    ``checkpoint-<at_step>``). Every rank draws the identical perturbation. The record is
    kept in ``self.record`` and, when ``record_path`` is given, written there by the main
    process.

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
    ):
        self.config = config if isinstance(config, PerturbationConfig) else PerturbationConfig.from_dict(config)
        if int(at_step) < 0:
            raise SpawnStepError(f"at_step must be >= 0, got {at_step}.")
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
        if self.config.kind == "data_order":
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
        if self.config.kind == "dropout":
            torch.manual_seed(self.record.reseed)  # seeds CPU and every CUDA device

    def _apply(self, args: TrainingArguments, state: TrainerState, model: Any, dataloader: Any) -> None:
        batch = None
        if self.config.kind == "batch" and self.config.changes_weights:
            batch = _independent_batch(dataloader, self.config, self.at_step, self.child)
        record = perturb_model(model, self.config, step=self.at_step, child=self.child, batch=batch)
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
