"""Reading Trainer checkpoints back: weights under the model's own names, damaged files named.

``save_pretrained`` may write older names than the module tree's (transformers 5.23's ViT saves
``encoder.layer.N.attention.attention.query`` for ``layers.N.attention.q_proj``), and only
``from_pretrained`` maps them back: the Trainer's own resume loads such a checkpoint with
``strict=False`` and silently keeps the fresh weights of every renamed tensor (a control child
spawned at t > 0 ended 0.01 from its parent). Checkpoints whose names differ are loaded through
``from_pretrained``'s mapping, and strictly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..adapters import is_peft_model
from ..atomic_io import disk_full_error
from ..errors import HfStabilityError, RunDirectoryError
from ..hints import setting
from ..run_directory import ADAPTER_WEIGHTS_NAME, WEIGHTS_NAME


def needs_name_conversion(model: nn.Module, checkpoint: Path) -> bool:
    """Whether the checkpoint's weight names are not the model's own."""
    weights = checkpoint / WEIGHTS_NAME
    if not weights.is_file():
        return False
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        return not set(f.keys()) <= set(model.state_dict())


def checkpoint_state_dict(model: nn.Module, checkpoint: Path) -> dict[str, torch.Tensor]:
    """The weights of a Trainer checkpoint under the names ``model`` uses now (a PEFT model's
    checkpoint: its adapter, under PEFT's saved names; see ``load_checkpoint_weights``)."""
    from safetensors.torch import load_file

    if is_peft_model(model):
        return load_file(str(checkpoint / ADAPTER_WEIGHTS_NAME))
    if not needs_name_conversion(model, checkpoint):
        return load_file(str(checkpoint / WEIGHTS_NAME))
    return converted_state_dict(model, checkpoint)


def load_checkpoint_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Put weights read by ``checkpoint_state_dict`` into ``model`` (a PEFT model: into its adapter).

    Raises:
        RunDirectoryError: the checkpoint's adapter is not this model's.
    """
    if not is_peft_model(model):
        model.load_state_dict(weights, strict=False)  # tied weights are saved once
        return
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, weights)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise RunDirectoryError(
            f"The adapter checkpoint holds tensors this PEFT model does not have ({unexpected[:3]}): it was written "
            f"with another adapter configuration. Run the study again with {setting('overwrite_run')}."
        )


def converted_state_dict(model: nn.Module, checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint whose names are not the model's, through from_pretrained's name mapping.

    Raises:
        RunDirectoryError: the checkpoint was written by another architecture.
    """
    from transformers import PreTrainedModel

    from ..perturb.rng import preserve_global_rng

    if not isinstance(model, PreTrainedModel):
        raise RunDirectoryError(
            f"The weights in {checkpoint} have names the {type(model).__name__} does not have: the checkpoint was "
            f"written by another architecture or library version. Run the study again with {setting('overwrite_run')}.",
            path=checkpoint,
        )
    with preserve_global_rng():  # building the model must not move the RNG a resumed run restores
        state = type(model).from_pretrained(str(checkpoint), use_safetensors=True).state_dict()
    if set(state) != set(model.state_dict()):
        raise RunDirectoryError(
            f"The weights in {checkpoint} do not match the {type(model).__name__} even after from_pretrained's name "
            "mapping: the checkpoint was written by another architecture. Run the study again with "
            f"{setting('overwrite_run')}.",
            path=checkpoint,
        )
    return state


@contextlib.contextmanager
def checkpoint_file_errors(checkpoint: str | None) -> Iterator[None]:
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
            f"again with {setting('overwrite_run')}.", path=checkpoint,
        ) from None
