"""ButterflyStudy: one butterfly study on a trainer, top to bottom like run_glue's ``main()``.

``run()`` plans (checks before anything is written), prepares the run directory, trains the
parent, then every child from its spawn checkpoint, and finalises. Each of those runs is one
``Trainer.train()`` call inside ``run_scope``, the one place that changes the trainer for a run
(output folder, callbacks, a stacked model...) and puts it back afterwards.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerState
from transformers.trainer_utils import enable_full_determinism, set_seed

from ..atomic_io import disk_full_as_error, save_tensors, write_json
from ..errors import ChildDivergedError, HfStabilityError, RunDirectoryError
from ..hints import setting
from ..manifest import named_files, verify, write_manifest
from ..run_directory import (
    DIVERGENCE_NAME,
    EVAL_RESULTS_NAME,
    MANIFEST_NAME,
    PERTURBATION_NAME,
    TRAINER_STATE_NAME,
    RunDirectory,
    checkpoint_problem,
    checkpoint_step,
    kept_snapshot_steps,
)
from ..run_lock import locked_run_on_main
from .analysis_data import save_analysis_data, save_base_model
from .callbacks import DivergenceCallback, ParentTrajectoryCallback, PerturbationCallback, SpawnCheckpointCallback
from .determinism import deterministic_algorithms
from .divergence import compared_parameters, divergence_steps
from .final_writer import FinalWriter, can_write_in_background
from .identity import run_config
from .preflight import check_study
from .result import ButterflyResult
from .stacked import StackedModel, train_stacked_group
from .stacked_attention import PER_CHILD, attention_for_stacked_run

logger = logging.getLogger(__name__)


@dataclass
class RunSettings:
    """What one run of a study changes on the trainer; ``run_scope`` applies it and undoes it.
    The trainer's hooks read it as ``trainer.study_run`` (outside a study: the defaults)."""

    output_dir: Path | None = None
    callbacks: list[TrainerCallback] = field(default_factory=list)
    child: tuple[int, int] | None = None  # (spawn step, child) of a child run: a NaN loss stops it as diverged
    stacked_numerics: bool = False  # the run directory was made for stacked children (see stacked.py)
    eager_attention: bool = False  # and before per-child attention: eager attention on CUDA (stacked_attention.py)
    save_initial_checkpoint: bool = False  # the parent spawns at step 0: checkpoint-0 before the first step
    stacked_optimizer_state: dict[str, Any] | None = None  # a stacked group's optimizer state, K children deep
    model: nn.Module | None = None  # a model to train instead of the trainer's own (a stacked group)
    model_init: Callable[[], nn.Module] | None = None  # and its model_init
    args: dict[str, Any] = field(default_factory=dict)  # TrainingArguments fields set for the run only
    # copy each batch to the device without waiting for the steps before it (a stacked group, whose
    # replayed step leaves the host free to run ahead; accelerate's DataLoaderConfiguration.non_blocking)
    non_blocking_copies: bool = False


@contextlib.contextmanager
def run_scope(trainer: Any, settings: RunSettings) -> Iterator[None]:
    """Apply ``settings`` to ``trainer`` for one run, and put back everything it changed."""
    changed = {"output_dir", *settings.args}
    saved_args = {name: getattr(trainer.args, name) for name in changed}
    saved = (trainer.model_init, trainer.study_run, list(trainer.callback_handler.callbacks))
    saved_model = (trainer.model, trainer.model_wrapped) if settings.model is not None else None
    loader_config = getattr(trainer.accelerator, "dataloader_config", None)
    saved_non_blocking = getattr(loader_config, "non_blocking", None)
    try:
        if settings.non_blocking_copies and saved_non_blocking is not None:
            loader_config.non_blocking = True
        trainer.args.output_dir = str(settings.output_dir)
        for name, value in settings.args.items():
            setattr(trainer.args, name, value)
        if settings.model is not None:
            trainer.model = trainer.model_wrapped = settings.model
        if settings.model_init is not None:
            trainer.model_init = settings.model_init
        trainer.callback_handler.callbacks.extend(settings.callbacks)  # (add_callback warns on a second instance)
        trainer.study_run = settings
        trainer.optimizer, trainer.lr_scheduler = None, None
        if settings.stacked_numerics and settings.model is None:
            attention_for_stacked_run(trainer.model, settings.eager_attention, trainer.args.device)
        yield
    finally:
        for name, value in saved_args.items():
            setattr(trainer.args, name, value)
        trainer.model_init, trainer.study_run, trainer.callback_handler.callbacks = saved
        if saved_non_blocking is not None:
            loader_config.non_blocking = saved_non_blocking
        if saved_model is not None:
            trainer.model, trainer.model_wrapped = saved_model


def call_without_trial(model_init: Callable[..., nn.Module]) -> nn.Module:
    """``model_init()`` or ``model_init(None)``, as the Trainer calls it outside a search."""
    return model_init(None) if len(inspect.signature(model_init).parameters) == 1 else model_init()


class ButterflyStudy:
    """The study of ``trainer.stability_args`` on ``trainer`` (a StabilityMixin Trainer)."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.stability = trainer.stability_args
        self.max_steps = 0
        self.fingerprint: str | None = None
        self.stacked_numerics = False
        self.eager_attention = False
        # what children can differ from the parent in: the trainable parameters (see compared_parameters)
        self.trainable_only = self.stability.perturbation_trainable_only
        self._checked_spawns: set[int] = set()
        self.writer: FinalWriter | None = None  # the children's final/ writes, while later children train
        self.rng_after_model_init: dict[bytes, Any] = {}  # a stacked group's model_init draws (stacked.py)
        self.last_stack: StackedModel | None = None  # the last stacked group's model, reused by the next (stacked.py)

    # ---- the study, top to bottom ------------------------------------------------------------
    def run(self) -> ButterflyResult:
        trainer = self.trainer
        with deterministic_algorithms(self.stability.deterministic), disk_full_as_error(trainer.args.output_dir):
            # (a full disk in the Trainer's own writes, its checkpoints, becomes a DiskFullError too)
            self.max_steps = check_study(trainer)  # bad input is refused before anything is written
            with locked_run_on_main(trainer.args.output_dir, "butterfly", trainer.accelerator, create=True):
                run = self.prepare(RunDirectory(trainer.args.output_dir))
                self.train_parent(run)
                for t in self.stability.spawn_steps:  # each spawn checkpoint still needed, before any child trains
                    if self.pending(run, t):
                        self.spawn_checkpoint(run, t)
                self.train_children(run)
                return self.finish(run)

    def prepare(self, run: RunDirectory) -> RunDirectory:
        """stability_config.json (or the check that the run found there is this study), a killed
        run's temporaries removed, the analysis data saved; the run's settings read back."""
        trainer = self.trainer
        failure: HfStabilityError | None = None
        if trainer.is_world_process_zero():
            try:
                config = run_config(trainer, self.max_steps)
                run.prepare(config, overwrite=self.stability.overwrite_run)
                run.remove_temporaries()  # we hold the lock: nobody is writing them
                save_analysis_data(trainer, run, config["fingerprint"])
                save_base_model(trainer, run, config["fingerprint"])
            except HfStabilityError as err:
                failure = err
        failure = self.broadcast(failure)  # every rank stops, not only rank 0
        if failure is not None:
            raise failure
        # The run's numerics are fixed when it is created: a resumed run keeps its parent's.
        config = run.load_config() if trainer.is_world_process_zero() else {}
        self.stacked_numerics = self.broadcast(bool(config.get("stacked_numerics")))
        self.eager_attention = self.broadcast(self.stacked_numerics and config.get("stacked_attention") != PER_CHILD)
        self.fingerprint = self.broadcast(config.get("fingerprint"))
        trainer.study_run = RunSettings(stacked_numerics=self.stacked_numerics, eager_attention=self.eager_attention)
        if self.stability.children_at_once > 1 and not self.stacked_numerics and trainer.args.device.type == "cuda":
            logger.warning("This run was created with parallel_children=1: its parent used the fused dropout kernel, "
                           "whose masks stacked children cannot draw, so their control will not follow the parent "
                           "closely. Use parallel_children=1 here, or %s to train the parent again.",
                           setting("overwrite_run"))
        return run

    def train_parent(self, run: RunDirectory) -> None:
        """The parent, with a checkpoint at every spawn step and its weights at every divergence
        step (resumed from its last complete checkpoint)."""
        if run.parent_final.is_dir():
            return  # done; the spawn checkpoints are checked where a child still needs one
        trainer, stability = self.trainer, self.stability
        reference_steps = set(stability.spawn_steps)
        for t in stability.spawn_steps:
            reference_steps.update(divergence_steps(t, self.max_steps, stability.divergence_every))
        reference_steps.discard(0)
        resume = None
        if trainer.is_world_process_zero():
            resume = run.last_complete_checkpoint(
                run.parent_dir, requires=lambda step: [run.trajectory_file(s) for s in reference_steps if s <= step])
        resume = self.broadcast_path(resume)
        if resume is None:
            if run.initial_weights.is_file():
                if trainer.model_init is None:
                    _load_parameters(trainer.model, run.initial_weights, self.trainable_only)
            elif trainer.is_world_process_zero():
                save_tensors(run.initial_weights, compared_parameters(trainer.model, self.trainable_only))
        # a resumed parent must not keep snapshots newer than its checkpoint: they are made again
        if trainer.is_world_process_zero() and run.trajectory_dir.is_dir():
            start = checkpoint_step(resume) if resume is not None else 0
            for path in run.trajectory_dir.glob("step-*.safetensors"):
                if int(path.stem.split("-")[-1]) > start:
                    path.unlink()
        trainer.accelerator.wait_for_everyone()
        if trainer.args.save_total_limit is not None:
            logger.warning("save_total_limit is ignored for the parent: its spawn checkpoints must all be kept.")
        settings = RunSettings(
            output_dir=run.parent_dir,
            callbacks=[SpawnCheckpointCallback(s for s in stability.spawn_steps if s > 0),
                       ParentTrajectoryCallback(reference_steps, run.trajectory_file,
                                                trainable_only=self.trainable_only)],
            stacked_numerics=self.stacked_numerics,
            eager_attention=self.eager_attention,
            save_initial_checkpoint=0 in stability.spawn_steps,
            args={"save_total_limit": None},
        )
        with run_scope(trainer, settings):
            self.train_run(resume, settings.callbacks)
            self.finalize(run.parent_final, self.parent_records(run))

    def train_children(self, run: RunDirectory) -> None:
        """Every child not finished yet, group by group (a group of one trains alone). Groups are
        fixed by the plan, not by what is left to do: a group killed after some of its children
        were written trains again whole (the same stack, the same bits) and writes only the
        missing ones."""
        stability = self.stability
        total = sum(len(stability.children_at(t)) for t in stability.spawn_steps)
        groups = [(t, group) for t in stability.spawn_steps for group in stability.child_groups(t)]
        todo = [(t, group, [k for k in group if run.child_status(t, k) == "pending"]) for t, group in groups]
        self.writer = FinalWriter()
        try:
            with tqdm(total=total, desc="children", unit="child", disable=not self.trainer.is_world_process_zero(),
                      position=0) as progress:
                progress.update(sum(len(group) - len(pending) for _, group, pending in todo))
                todo = [(t, group, pending) for t, group, pending in todo if pending]
                for t, group, pending in todo:
                    if len(group) > 1:
                        train_stacked_group(self, run, t, group, pending)
                    else:
                        self.last_stack = None  # (a child alone gets the memory the stack held)
                        self.train_child(run, t, group[0])
                    progress.update(len(pending))
            self.writer.wait()
        finally:
            self.writer.close()
            self.writer = None
            self.last_stack = None

    def train_child(self, run: RunDirectory, t: int, k: int) -> None:
        """Child k of spawn step t: resumed from its own latest checkpoint, else from the spawn
        checkpoint, perturbed there, trained to the last step."""
        trainer = self.trainer
        directory = run.child_dir(t, k)
        spawn = self.spawn_checkpoint(run, t)
        if trainer.is_world_process_zero():
            directory.mkdir(parents=True, exist_ok=True)
        own = run.last_complete_checkpoint(directory) if trainer.is_world_process_zero() else None
        resume = self.broadcast_path(own) or spawn
        settings = RunSettings(
            output_dir=directory,
            callbacks=[
                PerturbationCallback(self.stability.config_for_child(k), at_step=t, child=k,
                                     record_path=run.perturbation_file(t, k), model_init=self.model_init()),
                DivergenceCallback(
                    spawn_step=t, steps=divergence_steps(t, self.max_steps, self.stability.divergence_every),
                    path_for=lambda step: self.reference_file(run, step), output_file=run.divergence_file(t, k),
                    logs=trainer.divergence_logs, trainable_only=self.trainable_only,
                ),
            ],
            child=(t, k),
            stacked_numerics=self.stacked_numerics,
            eager_attention=self.eager_attention,
        )
        with run_scope(trainer, settings):
            try:
                self.train_run(resume, settings.callbacks)
            except ChildDivergedError as err:
                logger.warning("Child %d of spawn step %d diverged at step %d (%s); going on.", k, t, err.step,
                               err.reason)
                if trainer.is_world_process_zero():
                    write_json(run.diverged_file(t, k), {"step": err.step, "reason": err.reason})
                trainer.accelerator.wait_for_everyone()
                return
            # the child's checkpoints go once its final/ is written (a killed write resumes from them)
            self.finalize(run.child_final(t, k), self.child_records(run, t, k),
                          then=None if self.stability.keep_child_checkpoints else lambda: _drop_checkpoints(directory))

    def finish(self, run: RunDirectory) -> ButterflyResult:
        """Drop the parent's snapshots a finished study does not keep; the summary."""
        trainer = self.trainer
        if trainer.is_world_process_zero() and not self.stability.keep_parent_trajectory:
            # the snapshots at the spawn steps and the last step stay: a damaged child is retrained from them
            kept = {run.trajectory_file(step)
                    for step in kept_snapshot_steps(self.stability.spawn_steps, self.max_steps)}
            for snapshot in run.trajectory_dir.glob("step-*.safetensors"):
                if snapshot not in kept:
                    snapshot.unlink()
        trainer.accelerator.wait_for_everyone()
        trainer.study_run = RunSettings()
        return ButterflyResult(run_dir=run.root, max_steps=self.max_steps, parent_metrics=run.parent_metrics(),
                               children=run.summary())

    # ---- one run -----------------------------------------------------------------------------
    def train_run(self, resume: Path | None, callbacks: list[TrainerCallback]) -> None:
        """One Trainer.train() of the run in scope: seeded RNG, resumed from ``resume``. A run whose
        last checkpoint is already at the last step is only loaded (see load_finished_run)."""
        trainer = self.trainer
        enable_full_determinism(trainer.args.seed) if trainer.args.full_determinism else set_seed(trainer.args.seed)
        if resume is not None and checkpoint_step(resume) >= self.max_steps:
            self.load_finished_run(resume, callbacks)
            return
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)

    def load_finished_run(self, checkpoint: Path, callbacks: list[TrainerCallback]) -> None:
        """A run killed after its checkpoint at the last step and before its final/ was written:
        load that checkpoint's model and state as train() would, and train no further.
        ``train(resume_from_checkpoint=...)`` would take one more optimizer step (global step
        max_steps + 1), which changes the weights under any schedule whose last learning rate is
        not 0."""
        trainer = self.trainer
        if trainer.model_init is not None:
            trainer.model = trainer.call_model_init()
            if trainer.place_model_on_device:
                trainer._move_model_to_device(trainer.model, trainer.args.device)
            trainer.model_wrapped = trainer.model
        trainer._load_from_checkpoint(str(checkpoint))
        trainer.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
        for callback in callbacks:
            if isinstance(callback, DivergenceCallback):
                callback.complete_record(trainer.state, trainer.model)

    def finalize(self, final_dir: Path, records: dict[str, Path], then: Callable[[], None] | None = None) -> None:
        """Evaluate, then write ``final/`` (weights, config, tokenizer, eval results and the run's
        manifest) in one rename, and call ``then``. The manifest holds the checksums of final/'s
        files and of ``records`` (the run's other files, by their names in the run's folder).
        A child's files are written by the study's FinalWriter, in the background, where it can."""
        trainer = self.trainer
        metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

        def write_records(tmp: Path) -> None:
            write_json(tmp / EVAL_RESULTS_NAME, numbers)
            write_manifest(tmp / MANIFEST_NAME, {**named_files(tmp, final_dir.name), **records}, self.fingerprint)

        if self.writer is not None and can_write_in_background(trainer):
            processing_class = trainer.processing_class
            if processing_class is None:  # what Trainer._save saves in its place
                processing_class = getattr(trainer.data_collator, "tokenizer", None)
            self.writer.submit(final_dir, trainer.model, processing_class, write_records, then)
            return
        tmp = final_dir.with_name(".final.tmp")
        if trainer.is_world_process_zero() and tmp.exists():
            shutil.rmtree(tmp)
        trainer.accelerator.wait_for_everyone()
        trainer.save_model(str(tmp))
        if trainer.is_world_process_zero():
            (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle: not part of the run directory
            write_records(tmp)
            os.replace(tmp, final_dir)
            if then is not None:
                then()
        trainer.accelerator.wait_for_everyone()

    # ---- the run directory's files a study reads or records ----------------------------------
    def pending(self, run: RunDirectory, t: int) -> list[int]:
        return [k for k in self.stability.children_at(t) if run.child_status(t, k) == "pending"]

    def model_init(self) -> Callable[[], nn.Module] | None:
        """The trainer's model_init as a call without arguments (an init-seed child's other
        initialisation), or None when the trainer was given a model."""
        model_init = self.trainer.model_init
        return None if model_init is None else lambda: call_without_trial(model_init)

    def reference_file(self, run: RunDirectory, step: int) -> Path:
        """The parent's weights a child is compared with at ``step``."""
        return run.initial_weights if step == 0 else run.trajectory_file(step)

    def parent_records(self, run: RunDirectory) -> dict[str, Path]:
        """The parent's files besides final/ that its manifest covers: its initial weights, the spawn
        checkpoints and the snapshots a finished study keeps (see kept_snapshot_steps)."""
        files = [run.initial_weights] + [run.trajectory_file(step)
                                         for step in kept_snapshot_steps(self.stability.spawn_steps, self.max_steps)]
        records = {run.parent_name(path): path for path in files}
        for t in self.stability.spawn_steps:
            records.update(named_files(run.parent_checkpoint(t), run.parent_checkpoint(t).name))
        return records

    @staticmethod
    def child_records(run: RunDirectory, t: int, k: int) -> dict[str, Path]:
        return {PERTURBATION_NAME: run.perturbation_file(t, k), DIVERGENCE_NAME: run.divergence_file(t, k)}

    def spawn_checkpoint(self, run: RunDirectory, t: int) -> Path:
        """The parent's checkpoint at spawn step ``t``, checked once per process: it must be
        complete and, where the parent's manifest recorded them, its files and the parent's
        snapshots a child of step ``t`` is measured against must match their checksums
        (children must never start from a partial or damaged one)."""
        spawn = run.parent_checkpoint(t)
        if t in self._checked_spawns:
            return spawn
        remedy = (f"The children of spawn step {t} that are still to train start from it: restore {spawn.name} from a "
                  f"copy of the run, or set {setting('overwrite_run')} to train the parent again (this deletes the "
                  "finished children too).")
        failure: HfStabilityError | None = None
        if self.trainer.is_world_process_zero():
            problem = checkpoint_problem(spawn)
            if problem is not None:
                failure = RunDirectoryError(f"The spawn checkpoint {spawn} is unusable: {problem}. {remedy}",
                                            path=spawn)
            elif run.manifest_of(run.parent_final).is_file():
                wanted = {run.parent_name(run.trajectory_file(s)) for s in (t, self.max_steps)}
                wanted.add(run.parent_name(run.initial_weights))
                try:
                    verify(run.manifest_of(run.parent_final), run.parent_dir, lambda name: remedy,
                           only=lambda name: name.startswith(f"{spawn.name}/") or name in wanted)
                except RunDirectoryError as err:
                    failure = err
        failure = self.broadcast(failure)
        if failure is not None:
            raise failure
        self._checked_spawns.add(t)
        return spawn

    # ---- ranks -------------------------------------------------------------------------------
    def broadcast(self, value: Any) -> Any:
        """Rank 0's value (picklable, made by hf_stability itself), shared with every rank."""
        if self.trainer.args.world_size <= 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def broadcast_path(self, path: Path | None) -> Path | None:
        """Rank 0's choice of a checkpoint, shared with every rank."""
        shared = self.broadcast(str(path) if path is not None else None)
        return Path(shared) if shared is not None else None


def _drop_checkpoints(directory: Path) -> None:
    for checkpoint in directory.glob("checkpoint-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)


def _load_parameters(model: nn.Module, path: Path, trainable_only: bool) -> None:
    """Load the parameters saved in ``path`` into ``model`` (the parent's initial weights)."""
    import torch
    from safetensors import safe_open

    params = compared_parameters(model, trainable_only)
    with torch.no_grad(), safe_open(str(path), framework="pt", device="cpu") as f:
        for name, p in params.items():
            p.copy_(f.get_tensor(name))
