"""StabilityMixin: butterfly() for any Trainer subclass, as Trainer hook overrides only.

``class MyTrainer(StabilityMixin, TheirTrainer)`` gives ``TheirTrainer`` (a subclass that
changes ``compute_loss``, ``Seq2SeqTrainer``, TRL's ``SFTTrainer``...) a ``butterfly()``;
``StabilityTrainer`` is the mixin on ``transformers.Trainer``. ``train()`` stays the Trainer's
own. The study itself (parent, children, run directory) is ``study.ButterflyStudy``; each
override below reads what the study's current run asks for from ``self.study_run``, and is
otherwise the Trainer's behaviour, so this file can be checked against each transformers
release in one screen.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..errors import ChildDivergedError
from ..run_directory import SCHEDULER_NAME
from .arguments import StabilityArguments
from .checkpoints import checkpoint_file_errors, converted_state_dict, needs_name_conversion
from .result import ButterflyResult
from .stacked import SameMaskDropout, StackedModel, clip_per_child
from .stacked_attention import attention_for_stacked_run
from .study import ButterflyStudy, RunSettings


class StabilityMixin:
    """Adds ``butterfly()`` to a ``transformers.Trainer`` subclass (put the mixin first)."""

    def __init__(self, *args: Any, stability_args: StabilityArguments | None = None, **kwargs: Any):
        optimizers = kwargs.get("optimizers", (None, None))
        self.user_optimizer = optimizers is not None and any(o is not None for o in optimizers)
        self.study_run = RunSettings()  # what the study's current run changes (none outside a study)
        super().__init__(*args, **kwargs)
        self.stability_args = stability_args if stability_args is not None else StabilityArguments()
        self.divergence_logs: dict[str, float] = {}  # filled by the divergence callbacks, merged by log()

    def butterfly(self) -> ButterflyResult:
        """Train the parent and every child into the run directory ``args.output_dir``, and
        return its summary. A killed study resumes where it stopped when started again.

        Raises:
            StudyArgumentsError, SpawnStepError, PerturbationConfigError, NoMatchingParametersError,
            StudySetupError: the study cannot run as set up (before anything is written).
            RunConfigMismatchError: output_dir holds a study of other settings.
            RunInUseError: another process is writing output_dir.
            RunDirectoryError: output_dir holds a damaged or unreadable run.
            DiskFullError: a write failed on a full disk (the study resumes once space is freed).
        """
        return ButterflyStudy(self).run()

    # ---- Trainer hooks --------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, plus a child's divergence at this step."""
        logs.update(self.divergence_logs)
        self.divergence_logs.clear()
        super().log(logs, start_time)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None):
        """The Trainer's step; in a run made for stacked children every model draws its dropout
        masks as vmap does, and a child whose loss is NaN or Inf stops as diverged."""
        with SameMaskDropout() if self.study_run.stacked_numerics else contextlib.nullcontext():
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self.study_run.child is not None and not torch.isfinite(loss).all():
            raise ChildDivergedError(self.state.global_step + 1, f"training loss is {float(loss)}")
        return loss

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        """Stacked children are clipped each on its own (a joint norm would mix them)."""
        if isinstance(self.model, StackedModel):
            return clip_per_child(self.model, self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """For stacked children: the mean of the children's norms, without rescaling any gradient
        (the Trainer's own norm would multiply every child's gradients by a NaN child's NaN)."""
        if isinstance(self.model, StackedModel):
            return grad_norm if grad_norm is not None else clip_per_child(self.model, None)
        return super()._get_grad_norm(model, grad_norm)

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """The Trainer's model_init; in a run made for stacked children, with the attention they
        can run (``attention_for_stacked_run``), so that a stacked control follows its parent."""
        model = super().call_model_init(trial)
        if self.study_run.stacked_numerics:
            attention_for_stacked_run(model, self.study_run.eager_attention, self.args.device)
        return model

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: str | None):
        """The Trainer's preparation; then, for a parent spawning at step 0, checkpoint-0: model,
        optimizer, scheduler and RNG exactly as the first step will find them."""
        prepared = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if self.study_run.save_initial_checkpoint and resume_from_checkpoint is None and self.state.global_step == 0:
            self._save_checkpoint(self.model, trial=None)
        return prepared

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """The Trainer's loading, strict where the checkpoint's names are not the model's own
        (checkpoints.py); nothing for stacked children, whose weights the stack holds."""
        if self.study_run.stacked_optimizer_state is not None:
            return
        target = model if model is not None else self.model
        if needs_name_conversion(target, Path(resume_from_checkpoint)):
            target.load_state_dict(converted_state_dict(target, Path(resume_from_checkpoint)), strict=True)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Stacked children: the spawn checkpoint's optimizer state repeated for every child, and
        its scheduler; otherwise the Trainer's own loading. A damaged file is named."""
        with checkpoint_file_errors(checkpoint):
            state = self.study_run.stacked_optimizer_state
            if state is None or checkpoint is None:
                return super()._load_optimizer_and_scheduler(checkpoint)
            self.optimizer.load_state_dict(state)
            scheduler = Path(checkpoint) / SCHEDULER_NAME
            if scheduler.is_file():
                self.lr_scheduler.load_state_dict(torch.load(scheduler, map_location="cpu", weights_only=True))
        return None

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """The Trainer's own, with a damaged RNG file named."""
        with checkpoint_file_errors(checkpoint):
            super()._load_rng_state(checkpoint)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The Trainer's own model card (what ``push_to_hub`` uploads), plus a stability section
        when ``output_dir`` holds an analysed butterfly run."""
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            from ..report.card import add_stability_section

            add_stability_section(Path(self.args.output_dir))


class StabilityTrainer(StabilityMixin, Trainer):
    """A ``transformers.Trainer`` that can run a butterfly study.

    ``train()`` is the Trainer's own. ``butterfly()`` trains a parent, saving checkpoints at the
    spawn steps, then resumes every child from its spawn checkpoint (same optimizer state,
    schedule, data order and RNG), perturbs it and trains it to the parent's last step. The run
    directory is ``args.output_dir``; a killed study resumes where it stopped when started again.

    Example::

        trainer = StabilityTrainer(model_init=init, args=TrainingArguments("runs/x", max_steps=200),
                                   train_dataset=train, eval_dataset=test,
                                   stability_args=StabilityArguments(spawn_steps=[0, 50, 150]))
        result = trainer.butterfly()
        table = result.format_table()  # spawn step, child, final L2 to parent, eval accuracy
    """
