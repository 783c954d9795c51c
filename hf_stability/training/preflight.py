"""Checks before anything of a study is written: every refusal the set-up allows comes now, not
after the parent trained for hours."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..adapters import is_peft_model
from ..errors import NoMatchingParametersError, SpawnStepError, StudySetupError
from ..perturb import WEIGHT_KINDS, ScaleMode, init_scales, select_parameters
from ..perturb.rng import preserve_global_rng
from .arguments import AUTO
from .stacked import check_parallel_children

logger = logging.getLogger(__name__)

#: The Trainer methods StabilityMixin overrides; a transformers without one cannot run a study.
REQUIRED_HOOKS = ("training_step", "_prepare_for_training", "_load_from_checkpoint", "_load_optimizer_and_scheduler",
                  "_load_rng_state", "_save_checkpoint")


def planned_max_steps(trainer: Any) -> int:
    """The optimizer steps the parent will take (max_steps, or what the epochs come to)."""
    if trainer.args.max_steps > 0:
        return int(trainer.args.max_steps)
    return int(trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1])


def check_study(trainer: Any) -> int:
    """Every check of the study ``trainer.stability_args`` on ``trainer``; returns its max_steps.

    Raises:
        StudySetupError, SpawnStepError, NoMatchingParametersError, UnknownInitScaleError: what
            the set-up cannot do, with what to do instead.
    """
    from transformers import Trainer

    stability, args = trainer.stability_args, trainer.args
    missing = [hook for hook in REQUIRED_HOOKS if not hasattr(Trainer, hook)]
    if missing:
        raise StudySetupError(f"This transformers version lacks the Trainer methods {missing}, through which a "
                              "butterfly study trains and resumes its runs: upgrade transformers (>= 5.0).")
    if trainer.user_optimizer:
        raise StudySetupError(
            "butterfly() builds a fresh optimizer for the parent and for every child and loads the spawn "
            "checkpoint's state into it, so it cannot reuse optimizers=(...). Choose the optimizer with "
            "TrainingArguments.optim / optim_args or override create_optimizer()."
        )
    if args.load_best_model_at_end:
        raise StudySetupError(
            "load_best_model_at_end=True replaces each run's final weights with an earlier checkpoint; a "
            "butterfly study compares the weights at the last step. Set load_best_model_at_end=False."
        )
    if trainer.train_dataset is None:
        raise StudySetupError("butterfly() needs a train_dataset.")
    check_model_can_be_analysed(trainer.model)
    if stability.parallel_children == AUTO or stability.children_at_once > 1:
        check_parallel_children(trainer)  # (for "auto": chooses how many children train at once)
    if stability.deterministic and stability.children_at_once > 1:
        logger.info("deterministic=True with %d children at a time: the control child trains alone (bitwise equal "
                    "to its parent); the stacked children run batched kernels, within rounding of each trained alone "
                    "(docs/parallel_children.md).", stability.children_at_once)
    check_perturbation(trainer.model, stability)
    initialisations = [k for k in stability.child_indices() if stability.config_for_child(k).kind == "init_seed"]
    if initialisations and trainer.model_init is None:
        raise StudySetupError(
            f"Children {initialisations} start from another initialisation (perturbation_kind=init_seed or "
            "reference_children), which model_init builds under another seed: build the Trainer with "
            "model_init=<a function returning a fresh model> instead of model=..."
        )
    check_training_batch(trainer)
    max_steps = planned_max_steps(trainer)
    late = [t for t in stability.spawn_steps if t >= max_steps]
    if late:
        raise SpawnStepError(
            f"Spawn steps {late} are at or beyond the last training step ({max_steps}): a child needs at least "
            f"one step to train. Choose spawn steps in [0, {max_steps - 1}] or train longer."
        )
    return max_steps


def check_model_can_be_analysed(model: nn.Module) -> None:
    """The analyzer rebuilds every final/ with ``from_pretrained``: refuse a model that saves no
    config.json (not a PreTrainedModel) before it trains, and warn when its class is not one that
    ``hf-stability analyze`` can find in transformers by name."""
    from transformers import PreTrainedModel

    if is_peft_model(model):  # its checkpoints hold the adapter; the base is saved once in RUN/base_model
        model = model.get_base_model()
    if not isinstance(model, PreTrainedModel):
        raise StudySetupError(
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


def check_perturbation(model: nn.Module, stability: Any) -> None:
    """The perturbation selects parameters (each pattern matches), their init scales are known,
    and ``num_entries`` does not exceed the entries selected."""
    configs = {}
    for k in stability.child_indices():
        config = stability.config_for_child(k)
        configs.setdefault(config.group, config)
    for config in configs.values():
        if config.kind in WEIGHT_KINDS:
            _check_weight_perturbation(model, config)


def _check_weight_perturbation(model: nn.Module, config: Any) -> None:
    if is_peft_model(model) and not config.trainable_only:
        raise StudySetupError(
            "perturbation_trainable_only=False with a PEFT model: its checkpoints save only the adapter, so a "
            "perturbed frozen base weight would be lost at the child's first checkpoint. Perturb the adapter "
            "(perturbation_trainable_only=True, the default), or study full fine-tuning of the merged model "
            "(model.merge_and_unload())."
        )
    selected = select_parameters(model, config.include, config.exclude, config.trainable_only)
    if config.scale_mode == ScaleMode.INIT:
        init_scales(model, list(selected))
    entries = sum(p.numel() for p in selected.values())
    if config.num_entries is not None and config.num_entries > entries:
        raise NoMatchingParametersError(
            f"perturbation_num_entries={config.num_entries} is larger than the {entries} entries the "
            "perturbation selects: lower it, or widen perturbation_include."
        )


def check_training_batch(trainer: Any) -> None:
    """One training batch through the collator and the model's loss: labels the model cannot take
    (strings, a column the model does not read) fail here with what to do. Moves no global RNG."""
    dataset = trainer.train_dataset
    columns = sorted(dataset[0]) if hasattr(dataset, "__getitem__") and len(dataset) else []
    with preserve_global_rng():
        try:
            batch = next(iter(trainer.get_train_dataloader()))
        except StopIteration:
            raise StudySetupError("The train_dataset is empty: butterfly() needs training examples.") from None
        except (ValueError, TypeError, KeyError) as err:
            raise StudySetupError(
                f"The data collator cannot batch the first training examples ({type(err).__name__}: "
                f"{str(err)[:200]}). Their columns are {columns}: labels must be numbers (class ids for "
                "classification, floats for regression), and text must be tokenised first."
            ) from None
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            return  # the model is sharded only when training starts: no forward pass here
        model = trainer.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                loss = trainer.compute_loss(model, trainer._prepare_inputs(batch))
        except ValueError as err:
            raise StudySetupError(
                f"The model computes no training loss from the first batch ({str(err)[:300]}). The training "
                f"data (columns {columns}) needs a 'labels' or 'label' column of numbers that the "
                f"{type(model).__name__} reads, or a data collator that makes the labels."
            ) from None
        finally:
            model.train(was_training)
    if not isinstance(loss, torch.Tensor):
        raise StudySetupError(f"compute_loss returned {type(loss).__name__}, not a loss tensor.")
