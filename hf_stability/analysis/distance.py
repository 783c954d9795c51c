"""L2 distance between the weights of two models."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ArchitectureMismatchError
from .compare import check_same_architecture, floating_state, layer_of


@dataclass
class L2Result:
    """``l2``: ||a - b||_2 over the compared parameters; ``relative``: l2 / sqrt(||a|| ||b||);
    ``per_tensor`` and ``per_layer``: the same L2 restricted to a tensor or a layer."""

    l2: float
    relative: float
    norm_a: float
    norm_b: float
    per_tensor: dict[str, float] = field(default_factory=dict)
    per_layer: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def l2_distance(a: nn.Module, b: nn.Module, per_layer: bool = False) -> L2Result:
    """L2 distance between the floating-point parameters of ``a`` and ``b``, in float64."""
    names = check_same_architecture(a, b)
    return l2_between(floating_state(a), floating_state(b), per_layer, names)


@torch.no_grad()
def l2_between(ta: dict[str, torch.Tensor], tb: dict[str, torch.Tensor], per_layer: bool = False,
               names: list[str] | None = None) -> L2Result:
    """L2 distance between two sets of named tensors with the same names (a PEFT study's adapters:
    ``adapters.adapter_tensors``), in float64."""
    if names is None:
        if set(ta) != set(tb):
            raise ArchitectureMismatchError(
                f"The models hold different tensors (only in one: {sorted(set(ta) ^ set(tb))[:3]}); compare runs of "
                "one architecture and adapter."
            )
        names = list(ta)
    squares: dict[str, float] = {}
    norm_a = norm_b = 0.0
    for name in names:
        x, y = ta[name].detach().double(), tb[name].detach().to(ta[name].device).double()
        squares[name] = float((x - y).pow(2).sum())
        norm_a += float(x.pow(2).sum())
        norm_b += float(y.pow(2).sum())
    l2 = math.sqrt(sum(squares.values()))
    norm_a, norm_b = math.sqrt(norm_a), math.sqrt(norm_b)
    denominator = math.sqrt(norm_a * norm_b)
    result = L2Result(l2=l2, relative=l2 / denominator if denominator > 0 else 0.0, norm_a=norm_a, norm_b=norm_b)
    if per_layer:
        result.per_tensor = {n: math.sqrt(v) for n, v in squares.items()}
        layers: dict[str, float] = {}
        for name, value in squares.items():
            layers[layer_of(name)] = layers.get(layer_of(name), 0.0) + value
        result.per_layer = {n: math.sqrt(v) for n, v in layers.items()}
    return result
