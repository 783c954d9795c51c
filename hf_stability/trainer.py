"""StabilityTrainer: a drop-in Trainer whose butterfly() runs a whole butterfly study."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import platform
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import enable_full_determinism, set_seed

from .arguments import StabilityArguments
from .atomic_io import atomic_directory, save_tensors, write_json
from .callback import PerturbationCallback
from .determinism import deterministic_algorithms, hardware_record
from .divergence import DivergenceCallback, ParentTrajectoryCallback, divergence_steps, named_floating_parameters
from .errors import (
    ChildDivergedError,
    HfStabilityError,
    NoMatchingParametersError,
    RunDirectoryError,
    SpawnStepError,
)
from .atomic_io import disk_full_error
from .parallel_children import (
    ELEMENTWISE_OPTIMIZERS,
    ChildLossCallback,
    SameMaskDropout,
    StackedDivergenceCallback,
    StackedModel,
    available_bytes,
    clip_per_child,
    estimate_bytes,
    stacked_optimizer_state,
    unstack_into,
    use_eager_attention,
)
from .perturb import WEIGHT_KINDS, init_scales, perturb_model, select_parameters
from .manifest import named_files, verify, write_manifest
from .run_directory import (
    DIVERGENCE_NAME,
    EVAL_RESULTS_NAME,
    MANIFEST_NAME,
    PERTURBATION_NAME,
    FORMAT_VERSION,
    ChildSummary,
    RunDirectory,
    checkpoint_problem,
    checkpoint_step,
    fingerprint,
    is_complete_checkpoint,
    kept_snapshot_steps,
)

logger = logging.getLogger(__name__)

# TrainingArguments that change where or how things are written, never the weights.
_NON_IDENTITY_ARGS = {
    "output_dir", "logging_dir", "run_name", "report_to", "disable_tqdm", "logging_steps", "logging_strategy",
    "logging_first_step", "logging_nan_inf_filter", "save_steps", "save_strategy", "save_total_limit",
    "save_only_model", "save_safetensors", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token",
    "hub_private_repo", "hub_always_push", "hub_revision", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "eval_steps", "eval_strategy",
    "per_device_eval_batch_size", "eval_accumulation_steps", "eval_delay", "eval_on_start", "overwrite_output_dir",
    "resume_from_checkpoint", "skip_memory_metrics", "include_num_input_tokens_seen", "project", "trackio_space_id",
    "log_level", "log_level_replica", "log_on_each_node", "do_train", "do_eval", "do_predict",
}
_VOLATILE_CONFIG_KEYS = (
    "_name_or_path", "name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "problem_type",
    "use_cache",
)
_NON_IDENTITY_STABILITY = {
    "overwrite_run", "keep_parent_trajectory", "keep_child_checkpoints", "divergence_every",
    "analysis_train_samples", "analysis_eval_samples", "base_model", "dataset_name", "parallel_children",
}


def _library_versions() -> dict[str, str]:
    import accelerate
    import datasets
    import transformers

    from . import __version__

    return {
        "hf_stability": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "python": platform.python_version(),
    }


@dataclass
class ButterflyResult:
    """What ``butterfly()`` returns: where the run is and one summary row per child."""

    run_dir: Path
    max_steps: int
    parent_metrics: dict[str, float]
    children: list[ChildSummary] = field(default_factory=list)

    def format_table(self, metric: str = "eval_accuracy") -> str:
        """A plain-text table: spawn step, child, final L2 to parent, the amplification (final L2 /
        L2 of the perturbation itself; n/a for the control) and the chosen eval metric."""
        header = f"{'spawn step':>10}  {'child':<12}  {'final L2 to parent':>18}  {'amplification':>13}  {metric:>14}"
        lines = [header, "-" * len(header)]
        parent = self.parent_metrics.get(metric)
        lines.append(f"{'-':>10}  {'parent':<12}  {0.0:>18.6g}  {'':>13}  {_fmt(parent):>14}")
        for row in self.children:
            name = f"c{row.child}" + (" (control)" if row.is_control else "")
            if row.status == "diverged":
                name = f"c{row.child} DIVERGED"
            moved = row.perturbation_l2 is not None and row.final_l2 is not None and row.perturbation_l2 > 0
            amplification = f"{row.final_l2 / row.perturbation_l2:.3g}x" if moved else "n/a"
            lines.append(
                f"{row.spawn_step:>10}  {name:<12}  {_fmt(row.final_l2):>18}  {amplification:>13}  "
                f"{_fmt(row.eval_metrics.get(metric)):>14}"
            )
        return "\n".join(lines)


def is_peft_model(model: nn.Module | None) -> bool:
    """Whether ``model`` is a PEFT model (an adapter around a base model): checked by class name,
    so that peft need not be installed."""
    return any(cls.__name__ == "PeftModel" and cls.__module__.startswith("peft.") for cls in type(model).__mro__)


def _needs_name_conversion(model: nn.Module, checkpoint: Path) -> bool:
    """Whether the checkpoint's weight names are not the model's own (see checkpoint_state_dict)."""
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        return False
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        return not set(f.keys()) <= set(model.state_dict())


def checkpoint_state_dict(model: nn.Module, checkpoint: Path) -> dict[str, torch.Tensor]:
    """The weights of a Trainer checkpoint under the names ``model`` uses now.

    ``save_pretrained`` may write older names than the module tree's (transformers 5.23's ViT
    saves ``encoder.layer.N.attention.attention.query`` for ``layers.N.attention.q_proj``), and
    only ``from_pretrained`` maps them back: the Trainer's own resume loads such a checkpoint with
    ``strict=False`` and silently keeps the fresh weights of every renamed tensor.
    """
    from safetensors.torch import load_file

    if not _needs_name_conversion(model, checkpoint):
        return load_file(str(checkpoint / "model.safetensors"))
    return _converted_state_dict(model, checkpoint)


def _converted_state_dict(model: nn.Module, checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint whose names are not the model's, through from_pretrained's name mapping."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise RunDirectoryError(
            f"The weights in {checkpoint} have names the {type(model).__name__} does not have: the checkpoint was "
            "written by another architecture or library version. Re-run with --overwrite_run."
        )
    from .perturb.rng import preserve_global_rng

    with preserve_global_rng():  # building the model must not move the RNG a resumed run restores
        state = type(model).from_pretrained(str(checkpoint), use_safetensors=True).state_dict()
    if set(state) != set(model.state_dict()):
        raise RunDirectoryError(
            f"The weights in {checkpoint} do not match the {type(model).__name__} even after from_pretrained's name "
            "mapping: the checkpoint was written by another architecture. Re-run with --overwrite_run."
        )
    return state


@contextlib.contextmanager
def _checkpoint_file_errors(checkpoint: str | None) -> Iterator[None]:
    """A checkpoint file that torch cannot read (truncated, bytes flipped) becomes a
    RunDirectoryError naming the checkpoint, not a raw unpickling traceback."""
    try:
        yield
    except HfStabilityError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
        if checkpoint is None or disk_full_error(err, checkpoint) is not None:
            raise
        raise RunDirectoryError(
            f"A file of the checkpoint {checkpoint} cannot be read ({type(err).__name__}: {str(err)[:200]}): it is "
            "damaged. Delete that checkpoint folder if it is a child's own (the child then restarts from its spawn "
            "checkpoint); a damaged spawn checkpoint must be restored from a copy of the run, or the parent trained "
            "again with --overwrite_run."
        ) from None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


class _SpawnCheckpointCallback(TrainerCallback):
    """Makes the parent save a full Trainer checkpoint at every spawn step (step 0: before the
    first optimizer step). Internal to StabilityTrainer, which owns it."""

    def __init__(self, trainer: StabilityTrainer, steps: list[int]):
        self.trainer = trainer
        self.steps = set(steps)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Not when resuming from checkpoint-0 itself: it is complete and must not be rewritten in place.
        if 0 in self.steps and state.global_step == 0 and not is_complete_checkpoint(Path(args.output_dir) / "checkpoint-0"):
            self.trainer._save_checkpoint(kwargs["model"], trial=None)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.global_step in self.steps:
            control.should_save = True


class StabilityTrainer(Trainer):
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

    def __init__(self, *args: Any, stability_args: StabilityArguments | None = None, **kwargs: Any):
        optimizers = kwargs.get("optimizers", (None, None))
        self._user_optimizer = optimizers is not None and any(o is not None for o in optimizers)
        super().__init__(*args, **kwargs)
        self.stability_args = stability_args if stability_args is not None else StabilityArguments()
        self._training_child: tuple[int, int] | None = None
        self._stacked_optimizer_state: dict[str, Any] | None = None
        self._stacked_numerics = False  # set by butterfly() from the run (see _match_stacked)
        self._run_fingerprint: str | None = None  # set by butterfly(): recorded in every manifest
        self._checked_spawns: set[int] = set()  # spawn checkpoints found whole in this process

    # ---- Trainer hooks -------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, plus the divergence of a child at this step."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, DivergenceCallback):
                logs.update(callback.pop_logs())
        super().log(logs, start_time)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None):
        # In a run made for stacked children, every model draws its dropout masks as vmap does.
        with SameMaskDropout() if self._stacked_numerics else contextlib.nullcontext():
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self._training_child is not None and not torch.isfinite(loss).all():
            raise ChildDivergedError(self.state.global_step + 1, f"training loss is {float(loss)}")
        return loss

    def _clip_grad_norm(self, model: torch.nn.Module) -> Any:
        """Stacked children are clipped each on its own (a joint norm would mix them)."""
        if isinstance(self.model, StackedModel):
            return clip_per_child(self.model, self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        """For stacked children: the mean of the children's norms, without rescaling any gradient
        (the Trainer's own norm would multiply every child's gradients by a NaN child's NaN)."""
        if isinstance(self.model, StackedModel):
            return grad_norm if grad_norm is not None else clip_per_child(self.model, None)
        return super()._get_grad_norm(model, grad_norm)

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """The Trainer's model_init, with the attention that stacked children use (see _match_stacked)."""
        model = super().call_model_init(trial)
        self._match_stacked(model)
        return model

    def _match_stacked(self, model: nn.Module | None) -> None:
        """In a run made for stacked children (``stacked_numerics`` in stability_config.json: it
        was created with parallel_children > 1), the parent and every child train on CUDA with the
        eager attention of stacked children, so that a stacked control follows its parent."""
        # (Trainer.__init__ calls model_init before _stacked_numerics exists)
        if (
            model is not None
            and getattr(self, "_stacked_numerics", False)
            and not isinstance(model, StackedModel)
            and self.args.device.type == "cuda"
        ):
            use_eager_attention(model)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if self._stacked_optimizer_state is not None:
            return  # stacked children: the stacked model already holds the perturbed weights
        target = model if model is not None else self.model
        if _needs_name_conversion(target, Path(resume_from_checkpoint)):
            target.load_state_dict(_converted_state_dict(target, Path(resume_from_checkpoint)), strict=True)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Stacked children: the spawn checkpoint's optimizer state repeated for every child, and
        its scheduler; otherwise the Trainer's own loading. A damaged file is named."""
        with _checkpoint_file_errors(checkpoint):
            if self._stacked_optimizer_state is None or checkpoint is None:
                return super()._load_optimizer_and_scheduler(checkpoint)
            self.optimizer.load_state_dict(self._stacked_optimizer_state)
            scheduler = Path(checkpoint) / "scheduler.pt"
            if scheduler.is_file():
                self.lr_scheduler.load_state_dict(torch.load(scheduler, map_location="cpu", weights_only=True))
        return None

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """The Trainer's own, with a damaged RNG file named."""
        with _checkpoint_file_errors(checkpoint):
            super()._load_rng_state(checkpoint)

    # ---- butterfly --------------------------------------------------------------------------
    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The Trainer's own model card (what ``push_to_hub`` uploads), plus a stability section
        (summary, table, figures) when ``output_dir`` holds an analysed butterfly run."""
        super().create_model_card(*args, **kwargs)
        output = Path(self.args.output_dir)
        card_file = output / "README.md"
        if not self.is_world_process_zero() or not card_file.is_file():
            return
        if not (output / "analysis" / "report.json").is_file():
            return
        from huggingface_hub import ModelCard

        from .errors import ReportError
        from .report import load_report, stability_section

        try:
            report = load_report(output)
        except ReportError as err:
            logger.warning("The model card gets no stability section: %s", err)
            return
        plots = {p.name: p for p in sorted((output / "analysis" / "plots").glob("*.png"))}
        section = stability_section(report, plots, plots_prefix="analysis/plots/").replace("## ", "### ")
        card = ModelCard.load(card_file)
        card.data.tags = sorted(set(card.data.tags or []) | {"hf-stability", "training-stability"})
        card.text = card.text.rstrip() + "\n\n## Training stability (hf_stability)\n\n" + section
        card.save(card_file)

    def butterfly(self) -> ButterflyResult:
        """Train the parent and every child; write and return the run directory's summary."""
        with deterministic_algorithms(self.stability_args.deterministic):
            try:
                return self._butterfly()
            except HfStabilityError:
                raise
            except Exception as err:  # a full disk in the Trainer's own writes (checkpoints) too
                full = disk_full_error(err, self.args.output_dir)
                if full is None:
                    raise
                raise full from err

    def _butterfly(self) -> ButterflyResult:
        self._check_butterfly_arguments()
        if self.stability_args.deterministic and self.stability_args.parallel_children > 1:
            logger.warning("deterministic=True with parallel_children=%d: stacked children run batched kernels, so "
                           "their control ends within rounding of the parent, not bitwise equal to it. Use "
                           "parallel_children=1 for a zero noise floor.", self.stability_args.parallel_children)
        sargs = self.stability_args
        max_steps = self._planned_max_steps()
        late = [t for t in sargs.spawn_steps if t >= max_steps]
        if late:
            raise SpawnStepError(
                f"Spawn steps {late} are at or beyond the last training step ({max_steps}): a child needs at least "
                f"one step to train. Choose spawn steps in [0, {max_steps - 1}] or train longer."
            )
        from .run_lock import locked_run_on_main

        # Bad input was refused above, before anything is written; from here on this process is the
        # run directory's only writer.
        with locked_run_on_main(self.args.output_dir, "butterfly", self.accelerator, create=True):
            return self._run_study(max_steps)

    def _run_study(self, max_steps: int) -> ButterflyResult:
        sargs = self.stability_args
        run = RunDirectory(self.args.output_dir)
        failure: HfStabilityError | None = None
        if self.is_world_process_zero():
            try:
                config = self._run_config(max_steps)
                run.prepare(config, overwrite=sargs.overwrite_run)
                run.remove_temporaries()  # a killed run's leftovers (we hold the lock: nobody is writing them)
                self._save_analysis_data(run, config["fingerprint"])
            except HfStabilityError as err:
                failure = err
        failure = self._broadcast_object(failure)  # every rank stops, not only rank 0
        if failure is not None:
            raise failure
        # The run's numerics are fixed when it is created: a resumed run keeps its parent's.
        config = run.load_config() if self.is_world_process_zero() else {}
        self._stacked_numerics = self._broadcast_object(bool(config.get("stacked_numerics")))
        self._run_fingerprint = self._broadcast_object(config.get("fingerprint"))
        if sargs.parallel_children > 1 and not self._stacked_numerics and self.args.device.type == "cuda":
            logger.warning("This run was created with parallel_children=1: its parent used fused dropout and attention "
                           "kernels, which stacked children cannot use, so their control will not follow the parent "
                           "closely. Use parallel_children=1 here, or --overwrite_run to train the parent again.")

        saved = (self.args.output_dir, self.args.save_total_limit)
        jobs = [(t, k) for t in sargs.spawn_steps for k in sargs.child_indices()]
        try:
            self._train_parent(run, max_steps)
            for t in sargs.spawn_steps:  # every spawn checkpoint still needed is checked before any child trains
                if any(run.child_status(t, k) == "pending" for k in sargs.child_indices()):
                    self._spawn_checkpoint(run, t, max_steps)
            progress = tqdm(
                total=len(jobs), desc="children", unit="child", disable=not self.is_world_process_zero(), position=0
            )
            with progress:
                for t in sargs.spawn_steps:
                    for group in sargs.child_groups():
                        # Groups are fixed by the plan, not by what is left to do: a group killed after some
                        # of its children were written trains again whole (the same stack, the same bits)
                        # and writes only the missing ones.
                        pending = [k for k in group if run.child_status(t, k) == "pending"]
                        progress.update(len(group) - len(pending))
                        if not pending:
                            continue
                        if len(group) > 1:
                            self._train_children_stacked(run, t, group, max_steps, pending)
                        else:
                            self._train_child(run, t, group[0], max_steps)
                        progress.update(len(pending))
        finally:
            self.args.output_dir, self.args.save_total_limit = saved

        if self.is_world_process_zero() and not sargs.keep_parent_trajectory:
            # the snapshots at the spawn steps and the last step stay: a damaged child is retrained from them
            kept = {run.trajectory_file(step) for step in kept_snapshot_steps(sargs.spawn_steps, max_steps)}
            for snapshot in run.trajectory_dir.glob("step-*.safetensors"):
                if snapshot not in kept:
                    snapshot.unlink()
        self.accelerator.wait_for_everyone()
        return ButterflyResult(
            run_dir=run.root, max_steps=max_steps, parent_metrics=run.parent_metrics(), children=run.summary()
        )

    def _save_analysis_data(self, run: RunDirectory, run_fingerprint: str) -> None:
        """Save the model inputs of a training subset and the evaluation set in RUN/data, so that
        the run can be analysed on another machine without the code that built the data."""
        import datasets
        from transformers import DataCollatorWithPadding

        sargs = self.stability_args
        wanted = {"train": (self.train_dataset, sargs.analysis_train_samples), "eval": (self.eval_dataset, sargs.analysis_eval_samples)}
        for split, (dataset, limit) in wanted.items():
            target = run.data_dir / split
            if target.is_dir() or dataset is None:
                continue
            if not isinstance(dataset, datasets.Dataset):
                logger.info("The %s dataset is not a datasets.Dataset: pass data to the analyzer yourself.", split)
                continue
            dataset = self._remove_unused_columns(dataset, description=split)
            count = len(dataset) if limit is None else min(limit, len(dataset))
            subset = dataset.select(range(count))
            if subset.format.get("type") == "custom":  # an on-the-fly transform: store what it returns
                subset = datasets.Dataset.from_list([subset[i] for i in range(count)])
            with atomic_directory(target) as tmp:
                subset.save_to_disk(str(tmp))
        collator = "padding" if isinstance(self.data_collator, DataCollatorWithPadding) else "default"
        tokenizer = run.data_dir / "tokenizer"
        if collator == "padding" and not tokenizer.is_dir():  # what the analyzer pads with
            with atomic_directory(tokenizer) as tmp:
                self.data_collator.tokenizer.save_pretrained(str(tmp))
        if not (run.data_dir / "collator.json").is_file():
            write_json(run.data_dir / "collator.json", {"collator": collator})
        if not run.data_manifest.is_file():  # the data is complete: record its checksums
            write_manifest(run.data_manifest, named_files(run.data_dir, ""), run_fingerprint)

    def _check_butterfly_arguments(self) -> None:
        if self._user_optimizer:
            raise HfStabilityError(
                "butterfly() builds a fresh optimizer for the parent and for every child and loads the spawn "
                "checkpoint's state into it, so it cannot reuse optimizers=(...). Choose the optimizer with "
                "TrainingArguments.optim / optim_args or override create_optimizer()."
            )
        if self.args.load_best_model_at_end:
            raise HfStabilityError(
                "load_best_model_at_end=True replaces each run's final weights with an earlier checkpoint; a "
                "butterfly study compares the weights at the last step. Set load_best_model_at_end=False."
            )
        if self.train_dataset is None:
            raise HfStabilityError("butterfly() needs a train_dataset.")
        self._check_model_can_be_analysed()
        if self.stability_args.parallel_children > 1:
            self._check_parallel_children()
        config = self.stability_args.perturbation_config()
        if config.kind in WEIGHT_KINDS:  # fail now, not after the parent has trained
            selected = select_parameters(self.model, config.include, config.exclude)
            if config.scale_mode == "init":
                init_scales(self.model, list(selected))
            entries = sum(p.numel() for p in selected.values())
            if config.num_entries is not None and config.num_entries > entries:
                raise NoMatchingParametersError(
                    f"perturbation_num_entries={config.num_entries} is larger than the {entries} entries the "
                    "perturbation selects: lower it, or widen perturbation_include."
                )
        self._check_training_batch()

    def _check_model_can_be_analysed(self) -> None:
        """The analyzer rebuilds every final/ with ``from_pretrained``: refuse a model that saves
        no config.json (not a PreTrainedModel) before it trains, and warn when its class is not one
        that ``hf-stability analyze`` can find in transformers by name."""
        from transformers import PreTrainedModel

        model = self.model
        if is_peft_model(model):
            raise HfStabilityError(
                f"butterfly() cannot train a PEFT model ({type(model).__name__}) yet: its checkpoints hold only the "
                "adapter (adapter_model.safetensors), which the children and the analyzer do not read. Study the "
                "merged model (model.merge_and_unload()) with full fine-tuning, or perturb a plain Trainer run of the "
                "adapter with PerturbationCallback."
            )
        if not isinstance(model, PreTrainedModel):
            raise HfStabilityError(
                f"butterfly() needs a transformers PreTrainedModel: every final/ is saved with save_pretrained and "
                f"rebuilt by the analyzer with from_pretrained, and a {type(model).__name__} saves no config.json. "
                "Wrap it in a PreTrainedModel subclass (with a PretrainedConfig), or perturb a plain Trainer run "
                "with PerturbationCallback."
            )
        import transformers

        if getattr(transformers, type(model).__name__, None) is not type(model):
            logger.warning(
                "%s is not a transformers class: `hf-stability analyze` cannot rebuild it from the run directory. "
                "Analyse the run from Python: hf_stability.analysis.analyze_run(RUN, model_class=%s).",
                type(model).__name__, type(model).__name__,
            )

    def _check_training_batch(self) -> None:
        """One training batch through the collator and the model's loss, before anything is
        written: labels the model cannot take (strings, a column the model does not read) fail
        here with what to do, not after the parent trained. Moves no global RNG."""
        from .perturb.rng import preserve_global_rng

        columns = sorted(self.train_dataset[0]) if hasattr(self.train_dataset, "__getitem__") else []
        with preserve_global_rng():
            try:
                batch = next(iter(self.get_train_dataloader()))
            except StopIteration:
                raise HfStabilityError("The train_dataset is empty: butterfly() needs training examples.") from None
            except (ValueError, TypeError, KeyError) as err:
                raise HfStabilityError(
                    f"The data collator cannot batch the first training examples ({type(err).__name__}: "
                    f"{str(err)[:200]}). Their columns are {columns}: labels must be numbers (class ids for "
                    "classification, floats for regression), and text must be tokenised first."
                ) from None
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                return  # the model is sharded only when training starts: no forward pass here
            model = self.model
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    loss = self.compute_loss(model, self._prepare_inputs(batch))
            except ValueError as err:
                raise HfStabilityError(
                    f"The model computes no training loss from the first batch ({str(err)[:300]}). The training "
                    f"data (columns {columns}) needs a 'labels' or 'label' column of numbers that the "
                    f"{type(model).__name__} reads, or a data collator that makes the labels."
                ) from None
            finally:
                model.train(was_training)
        if not isinstance(loss, torch.Tensor):
            raise HfStabilityError(f"compute_loss returned {type(loss).__name__}, not a loss tensor.")

    def _check_parallel_children(self) -> None:
        """Refuse, before anything trains, what stacked children cannot do as single children would."""
        sargs, args = self.stability_args, self.args
        problems = []
        if sargs.perturbation_kind in ("data_order", "dropout"):
            problems.append(f"perturbation_kind={sargs.perturbation_kind!r} gives each child its own data order or "
                            "dropout stream, and a stacked model sees one")
        if args.world_size > 1:
            problems.append("it runs on one device (this run has several processes)")
        if str(getattr(args.optim, "value", args.optim)) not in ELEMENTWISE_OPTIMIZERS:
            problems.append(f"optim={args.optim!r}: only AdamW ({', '.join(ELEMENTWISE_OPTIMIZERS)}) is elementwise, "
                            "so that one optimizer over the stacked tensors is one optimizer per child")
        for flag in ("gradient_checkpointing", "torch_compile", "deepspeed", "fsdp"):
            if getattr(args, flag, None):
                problems.append(f"{flag} is not supported for stacked children")
        hooks = ("_clip_grad_norm", "_get_grad_norm", "_load_from_checkpoint", "_load_optimizer_and_scheduler")
        if not all(hasattr(Trainer, hook) for hook in hooks):
            problems.append(f"this transformers version lacks one of the Trainer methods {', '.join(hooks)}, through "
                            "which stacked children are clipped and resumed; upgrade transformers")
        if self.compute_loss_func is not None or type(self).compute_loss is not StabilityTrainer.compute_loss:
            problems.append("a custom loss (compute_loss_func or an overridden compute_loss) sees all children at once")
        if problems:
            raise HfStabilityError(
                f"parallel_children={sargs.parallel_children} cannot be used here: " + "; ".join(problems)
                + ". Set parallel_children=1 to train the children one after the other."
            )
        model = self.model if self.model is not None else self.call_model_init()
        device = args.device
        seq_len = None
        try:  # the real sequence length of a batch, for the activations' share of the estimate
            first = next(iter(self.get_train_dataloader()))
            seq_len = int(first["input_ids"].shape[-1]) if "input_ids" in first else None
        except (StopIteration, KeyError, TypeError, AttributeError):
            pass
        need = estimate_bytes(model, sargs.parallel_children, args, seq_len)
        have = available_bytes(device)
        if need > 0.9 * have:
            raise HfStabilityError(
                f"parallel_children={sargs.parallel_children} needs about {need / 2**30:.1f} GiB on {device} "
                f"(weights, gradients and AdamW state of every child plus one batch of activations each), and "
                f"{have / 2**30:.1f} GiB are free. Lower parallel_children or the batch size."
            )

    def _spawn_checkpoint(self, run: RunDirectory, t: int, max_steps: int) -> Path:
        """The parent's checkpoint at spawn step ``t``, checked once per process: it must be
        complete and, where the parent's manifest recorded them, its files and the parent's
        snapshots a child of step ``t`` is measured against must match their checksums
        (children must never start from a partial or damaged one)."""
        spawn = run.parent_checkpoint(t)
        if t in self._checked_spawns:
            return spawn
        remedy = (f"The children of spawn step {t} that are still to train start from it: restore {spawn.name} from a "
                  "copy of the run, or pass --overwrite_run to train the parent again (this deletes the finished "
                  "children too).")
        failure: HfStabilityError | None = None
        if self.is_world_process_zero():
            problem = checkpoint_problem(spawn)
            if problem is not None:
                failure = RunDirectoryError(f"The spawn checkpoint {spawn} is unusable: {problem}. {remedy}")
            elif run.manifest_of(run.parent_final).is_file():
                wanted = {f"trajectory/{run.trajectory_file(s).name}" for s in (t, max_steps)}
                wanted.add("initial/model.safetensors")
                try:
                    verify(run.manifest_of(run.parent_final), run.parent_dir, lambda name: remedy,
                           only=lambda name: name.startswith(f"{spawn.name}/") or name in wanted)
                except RunDirectoryError as err:
                    failure = err
        failure = self._broadcast_object(failure)
        if failure is not None:
            raise failure
        self._checked_spawns.add(t)
        return spawn

    def _train_children_stacked(
        self, run: RunDirectory, t: int, children: list[int], max_steps: int, pending: list[int]
    ) -> None:
        """Train ``children`` of spawn step ``t`` as one stacked model (parallel_children.py), then
        write the final/ of each child in ``pending`` like a child trained alone (the others are
        already written). A killed group restarts from the spawn checkpoint."""
        sargs = self.stability_args
        spawn = self._spawn_checkpoint(run, t, max_steps)
        original_model, original_init = self.model, self.model_init
        template = original_model if original_model is not None else self.call_model_init()
        # The dataset columns the model takes come from its forward signature: read them now, from the
        # real model, not later from the stacked model's forward(**inputs).
        self._set_signature_columns_if_needed()
        weights = checkpoint_state_dict(template, spawn)
        configs = {k: sargs.config_for_child(k) for k in children}
        batches: dict[int, Any] = {}
        if any(config.kind == "batch" for config in configs.values()):
            from .callback import _independent_batch

            dataloader = self.get_train_dataloader()
            batches = {k: _independent_batch(dataloader, configs[k], t, k) for k in children}
        for k in pending:
            directory = run.child_dir(t, k)
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob("checkpoint-*"):
                shutil.rmtree(stale, ignore_errors=True)

        def perturbed_child(k: int) -> nn.Module:
            model = copy.deepcopy(template)
            model.load_state_dict(weights, strict=False)
            record = perturb_model(model, configs[k], step=t, child=k, batch=batches.get(k))
            if k in pending:
                write_json(run.child_dir(t, k) / "perturbation.json", record.to_dict())
            return model

        # Weight noise is drawn from each child's own CPU generator and touches no global RNG, so the
        # children are perturbed in threads (the draws dominate the set-up of a group). A gradient
        # perturbation runs a forward pass, whose dropout uses the global RNG: one at a time.
        workers = 1 if batches else min(len(children), os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            models = list(pool.map(perturbed_child, children))
        stacked = StackedModel(models)
        del models

        # The group resumes from the spawn checkpoint itself (trainer state, RNG, scheduler, scaler);
        # the weights are already in the stacked model and the optimizer state is repeated K times
        # in memory (_load_from_checkpoint and _load_optimizer_and_scheduler below).
        self._stacked_optimizer_state = stacked_optimizer_state(spawn / "optimizer.pt", len(children))
        group_dir = run.stacked_group_dir(t, children)
        shutil.rmtree(group_dir, ignore_errors=True)
        group_dir.mkdir(parents=True)

        diverged: dict[int, dict[str, Any]] = {}
        callbacks: list[TrainerCallback] = [
            ChildLossCallback(children, diverged),
            StackedDivergenceCallback(
                children, diverged,
                output_files={k: run.child_dir(t, k) / "divergence.jsonl" for k in pending},
                spawn_step=t,
                steps=divergence_steps(t, max_steps, sargs.divergence_every),
                path_for=lambda step: self._reference_file(run, step),
            ),
        ]
        saved_strategies = (self.args.save_strategy, self.args.eval_strategy)
        # no intermediate checkpoints or evaluations of the stack: each child is evaluated at the end
        self.args.save_strategy = self.args.eval_strategy = "no"
        self.model = self.model_wrapped = stacked
        if original_init is not None:
            # Build (and drop) one model as train() would: the global RNG then stands where it stands
            # for a child trained alone (the data sampler draws its seed from it).
            def stacked_init() -> nn.Module:
                self.model_init = original_init
                try:
                    self.call_model_init()
                finally:
                    self.model_init = stacked_init
                return stacked

            self.model_init = stacked_init
        try:
            self._train_run(group_dir, callbacks, spawn, max_steps)
        finally:
            self._stacked_optimizer_state = None
            self.args.save_strategy, self.args.eval_strategy = saved_strategies
            self.model_init = original_init
            self.callback_handler.callbacks = [
                cb for cb in self.callback_handler.callbacks if not isinstance(cb, ChildLossCallback)
            ]
        for index, k in enumerate(children):
            if k not in pending:
                continue
            if k in diverged:
                logger.warning("Child %d of spawn step %d diverged at step %d (%s); going on.", k, t,
                               diverged[k]["step"], diverged[k]["reason"])
                write_json(run.child_dir(t, k) / "diverged.json", diverged[k])
                continue
            self.model = self.model_wrapped = unstack_into(stacked, index, template)
            self._finalize(run.child_final(t, k), self._child_records(run, t, k))
        self.model = self.model_wrapped = original_model if original_model is not None else template
        shutil.rmtree(group_dir, ignore_errors=True)

    def _planned_max_steps(self) -> int:
        if self.args.max_steps > 0:
            return int(self.args.max_steps)
        values = self.set_initial_training_values(self.args, self.get_train_dataloader())
        return int(values[-1])

    def _run_config(self, max_steps: int) -> dict[str, Any]:
        sargs = self.stability_args
        training = self.args.to_dict()
        model = self.model
        model_config = getattr(model, "config", None)
        model_info: dict[str, Any] = {"class": type(model).__name__}
        if model_config is not None and hasattr(model_config, "to_dict"):
            config_dict = model_config.to_dict()
            # keys that say where the model came from, or that training and saving fill in
            # (a second butterfly() on the same model must find the same configuration)
            for key in _VOLATILE_CONFIG_KEYS:
                config_dict.pop(key, None)
            model_info["config"] = config_dict
        dataset = self.train_dataset
        data_info = {
            "class": type(dataset).__name__,
            "length": len(dataset) if hasattr(dataset, "__len__") else None,
            "fingerprint": getattr(dataset, "_fingerprint", None),
        }
        identity = {
            "format_version": FORMAT_VERSION,
            "stability_arguments": {k: v for k, v in sargs.to_dict().items() if k not in _NON_IDENTITY_STABILITY},
            "training_arguments": {k: v for k, v in training.items() if k not in _NON_IDENTITY_ARGS},
            "model": model_info,
            "train_dataset": data_info,
            "max_steps": max_steps,
        }
        identity = json.loads(json.dumps(identity, sort_keys=True, default=str))  # as it will be read back
        return {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint(identity),
            "max_steps": max_steps,
            **sargs.plan(),
            "seeds": {"seed": self.args.seed, "data_seed": self.args.data_seed, "perturbation_seed": sargs.perturbation_seed},
            "stability_arguments": sargs.to_dict(),
            "training_arguments": training,
            "versions": _library_versions(),
            "hardware": hardware_record(self.args.device),
            # made for stacked children: every model trains with their dropout (and, on CUDA, attention)
            "stacked_numerics": sargs.parallel_children > 1,
            "identity": identity,
        }

    def _reference_file(self, run: RunDirectory, step: int) -> Path:
        return run.initial_weights if step == 0 else run.trajectory_file(step)

    def _train_parent(self, run: RunDirectory, max_steps: int) -> None:
        if run.parent_final.is_dir():
            return  # the spawn checkpoints are checked where a child still needs one
        sargs = self.stability_args
        reference_steps = set(sargs.spawn_steps)
        for t in sargs.spawn_steps:
            reference_steps.update(divergence_steps(t, max_steps, sargs.divergence_every))
        reference_steps.discard(0)
        resume = None
        if self.is_world_process_zero():
            resume = run.last_complete_checkpoint(
                run.parent_dir,
                requires=lambda step: [run.trajectory_file(s) for s in reference_steps if s <= step],
            )
        resume = self._broadcast_path(resume)
        if resume is None:
            if run.initial_weights.is_file():
                if self.model_init is None:
                    self._load_parameters(run.initial_weights)
            elif self.is_world_process_zero():
                save_tensors(run.initial_weights, named_floating_parameters(self.model))
        # a resumed parent must not keep snapshots newer than its checkpoint: they are made again
        if self.is_world_process_zero() and run.trajectory_dir.is_dir():
            start = int(resume.name.split("-")[-1]) if resume is not None else 0
            for path in run.trajectory_dir.glob("step-*.safetensors"):
                if int(path.stem.split("-")[-1]) > start:
                    path.unlink()
        self.accelerator.wait_for_everyone()

        callbacks = [
            _SpawnCheckpointCallback(self, sargs.spawn_steps),
            ParentTrajectoryCallback(reference_steps, run.trajectory_file),
        ]
        if self.args.save_total_limit is not None:
            logger.warning("save_total_limit is ignored for the parent: its spawn checkpoints must all be kept.")
        self.args.save_total_limit = None
        self._train_run(run.parent_dir, callbacks, resume, max_steps)
        self._finalize(run.parent_final, self._parent_records(run, max_steps))

    def _train_child(self, run: RunDirectory, t: int, k: int, max_steps: int) -> None:
        sargs = self.stability_args
        directory = run.child_dir(t, k)
        spawn = self._spawn_checkpoint(run, t, max_steps)
        if self.is_world_process_zero():
            directory.mkdir(parents=True, exist_ok=True)
        own = run.last_complete_checkpoint(directory) if self.is_world_process_zero() else None
        resume = self._broadcast_path(own) or spawn
        callbacks = [
            PerturbationCallback(sargs.config_for_child(k), at_step=t, child=k, record_path=directory / "perturbation.json"),
            DivergenceCallback(
                spawn_step=t,
                steps=divergence_steps(t, max_steps, sargs.divergence_every),
                path_for=lambda step: self._reference_file(run, step),
                output_file=directory / "divergence.jsonl",
            ),
        ]
        self._training_child = (t, k)
        try:
            self._train_run(directory, callbacks, resume, max_steps)
        except ChildDivergedError as err:
            logger.warning("Child %d of spawn step %d diverged at step %d (%s); going on.", k, t, err.step, err.reason)
            if self.is_world_process_zero():
                write_json(directory / "diverged.json", {"step": err.step, "reason": err.reason})
            self.accelerator.wait_for_everyone()
            return
        finally:
            self._training_child = None
        self._finalize(run.child_final(t, k), self._child_records(run, t, k))
        if self.is_world_process_zero() and not sargs.keep_child_checkpoints:
            for checkpoint in directory.glob("checkpoint-*"):
                shutil.rmtree(checkpoint, ignore_errors=True)

    def _train_run(
        self, output_dir: Path, callbacks: list[TrainerCallback], resume: Path | None, max_steps: int
    ) -> None:
        """One Trainer.train() call of the study: fresh optimizer, seeded RNG, extra callbacks. A run
        whose last checkpoint is already at ``max_steps`` is only loaded (see _load_finished_run)."""
        self.args.output_dir = str(output_dir)
        self.optimizer, self.lr_scheduler = None, None
        enable_full_determinism(self.args.seed) if self.args.full_determinism else set_seed(self.args.seed)
        if resume is not None and checkpoint_step(resume) >= max_steps:
            self._load_finished_run(resume, callbacks)
            return
        self.callback_handler.callbacks.extend(callbacks)  # (add_callback warns on a second instance of a class)
        self._match_stacked(self.model)
        try:
            self.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        finally:
            ours = (PerturbationCallback, DivergenceCallback, ParentTrajectoryCallback, _SpawnCheckpointCallback)
            self.callback_handler.callbacks = [
                cb for cb in self.callback_handler.callbacks if not isinstance(cb, ours)
            ]

    def _load_finished_run(self, checkpoint: Path, callbacks: list[TrainerCallback]) -> None:
        """A run killed after its checkpoint at the last step and before its final/ was written:
        load that checkpoint's model and state as train() would, and train no further.
        ``train(resume_from_checkpoint=...)`` would take one more optimizer step (global step
        max_steps + 1), which changes the weights under any schedule whose last learning rate is
        not 0."""
        if self.model_init is not None:
            self.model = self.call_model_init()
            if self.place_model_on_device:
                self._move_model_to_device(self.model, self.args.device)
            self.model_wrapped = self.model
        self._match_stacked(self.model)
        self._load_from_checkpoint(str(checkpoint))
        self.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
        for callback in callbacks:
            if isinstance(callback, DivergenceCallback):
                callback.complete_record(self.state, self.model)

    def _finalize(self, final_dir: Path, records: dict[str, Path]) -> None:
        """Evaluate, then write ``final/`` (weights, config, tokenizer, eval results and the run's
        manifest) in one rename. The manifest holds the checksums of final/'s files and of
        ``records`` (the run's other files, by their names in the run's folder)."""
        metrics = self.evaluate() if self.eval_dataset is not None else {}
        tmp = final_dir.with_name(".final.tmp")
        if self.is_world_process_zero() and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.save_model(str(tmp))
        if self.is_world_process_zero():
            (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle: not part of the run directory
            write_json(tmp / EVAL_RESULTS_NAME, {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
            files = {**named_files(tmp, final_dir.name), **records}
            write_manifest(tmp / MANIFEST_NAME, files, self._run_fingerprint)
            os.replace(tmp, final_dir)
        self.accelerator.wait_for_everyone()

    def _parent_records(self, run: RunDirectory, max_steps: int) -> dict[str, Path]:
        """The parent's files besides final/ that its manifest covers: its initial weights, the spawn
        checkpoints and the snapshots a finished study keeps (see kept_snapshot_steps)."""
        records = {"initial/model.safetensors": run.initial_weights}
        for t in self.stability_args.spawn_steps:
            records.update(named_files(run.parent_checkpoint(t), run.parent_checkpoint(t).name))
        for step in kept_snapshot_steps(self.stability_args.spawn_steps, max_steps):
            records[f"trajectory/{run.trajectory_file(step).name}"] = run.trajectory_file(step)
        return records

    @staticmethod
    def _child_records(run: RunDirectory, t: int, k: int) -> dict[str, Path]:
        return {PERTURBATION_NAME: run.perturbation_file(t, k), DIVERGENCE_NAME: run.divergence_file(t, k)}

    def _load_parameters(self, path: Path) -> None:
        params = named_floating_parameters(self.model)
        with torch.no_grad(), safe_open(str(path), framework="pt", device="cpu") as f:
            for name, p in params.items():
                p.copy_(f.get_tensor(name))

    def _broadcast_path(self, path: Path | None) -> Path | None:
        """Rank 0's choice of a checkpoint, shared with every rank."""
        shared = self._broadcast_object(str(path) if path is not None else None)
        return Path(shared) if shared is not None else None

    def _broadcast_object(self, value: Any) -> Any:
        """Rank 0's value (picklable, made by hf_stability itself), shared with every rank."""
        if self.args.world_size <= 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]
