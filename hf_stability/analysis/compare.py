"""Which tensors two models share: the comparison that every measure starts from."""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import ArchitectureMismatchError

_LAYER = re.compile(r"^(.*?\.(?:layer|layers|blocks|h)\.\d+)\.")


def floating_state(model: nn.Module, buffers: bool = False) -> dict[str, torch.Tensor]:
    """Floating-point parameters (and, with ``buffers``, floating buffers) by name."""
    tensors = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    if buffers:
        tensors.update({n: b for n, b in model.named_buffers() if b.is_floating_point()})
    return tensors


def check_same_architecture(a: nn.Module, b: nn.Module, buffers: bool = False) -> list[str]:
    """The names of the tensors to compare; raises naming the first tensor that differs."""
    ta, tb = floating_state(a, buffers), floating_state(b, buffers)
    if type(a) is not type(b):
        raise ArchitectureMismatchError(
            f"The models have different classes ({type(a).__name__} and {type(b).__name__}); compare runs of one "
            "architecture."
        )
    for name, tensor in ta.items():
        if name not in tb:
            raise ArchitectureMismatchError(f"Tensor {name!r} of the first model is missing from the second.")
        if tensor.shape != tb[name].shape:
            raise ArchitectureMismatchError(
                f"Tensor {name!r} has shape {tuple(tensor.shape)} in the first model and {tuple(tb[name].shape)} in "
                "the second."
            )
    extra = [n for n in tb if n not in ta]
    if extra:
        raise ArchitectureMismatchError(f"Tensor {extra[0]!r} of the second model is missing from the first.")
    return list(ta)


def layer_of(name: str) -> str:
    """The layer a tensor belongs to: ``bert.encoder.layer.3`` for its weights, else the first two
    components of its module path (``bert.embeddings``, ``classifier``)."""
    match = _LAYER.match(name)
    if match:
        return match.group(1)
    parts = name.split(".")[:-1]
    return ".".join(parts[:2]) if parts else name
