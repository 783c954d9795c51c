"""What an alignment may relabel: the tensor axes that share one permutation of hidden units.

A ``PermutationSpec`` is a list of ``PermutationGroup``s. A group holds one or more ``Slot``s;
a slot is one permutation of ``size`` units, applied to every axis it lists (``AxisRef``) and
read from every module output it lists (``ActivationRef``, for activation matching).

A group with ``num_heads > 1`` is an attention layer: its slots (query/key dimensions, value
dimensions) are cut into ``num_heads`` blocks of ``size // num_heads``; the heads are relabelled
together in every slot, and inside each head every slot has its own permutation. That is the
whole symmetry of multi-head attention.

A ``Permutation`` maps slot name -> LongTensor ``p`` of the slot's size: unit ``i`` of the
permuted model is unit ``p[i]`` of the original (``W'[i] = W[p[i]]`` along every listed axis).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import ArchitectureMismatchError

Permutation = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AxisRef:
    """Axis ``axis`` of parameter ``param`` from index ``start`` on, for the slot's size (``start``
    is 0 except inside fused tensors such as timm's qkv projection)."""

    param: str
    axis: int
    start: int = 0


@dataclass(frozen=True)
class ActivationRef:
    """The output of module ``module``, last dimension from ``start`` on, carries the slot's units."""

    module: str
    start: int = 0


@dataclass
class Slot:
    """One permutation of ``size`` units and where it acts."""

    name: str
    size: int
    axes: list[AxisRef] = field(default_factory=list)
    activations: list[ActivationRef] = field(default_factory=list)


@dataclass
class PermutationGroup:
    """Slots that are solved together (see the module docstring for ``num_heads``)."""

    name: str
    slots: list[Slot]
    num_heads: int = 1

    @property
    def head_dim(self) -> int:
        return self.slots[0].size // self.num_heads


@dataclass
class PermutationSpec:
    """Every permutation symmetry of one architecture, derived from a model instance.

    ``shapes`` lists every floating-point parameter the spec was derived from (permuted or not):
    a model to be permuted or matched must have exactly these tensors.
    """

    architecture: str
    groups: list[PermutationGroup]
    shapes: dict[str, tuple[int, ...]]

    @property
    def slots(self) -> dict[str, Slot]:
        return {slot.name: slot for group in self.groups for slot in group.slots}

    def axes_of(self, param: str) -> list[tuple[AxisRef, Slot]]:
        """The permuted axes (and their slots) of one parameter."""
        return self._by_param().get(param, [])

    def _by_param(self) -> dict[str, list[tuple[AxisRef, Slot]]]:
        if not hasattr(self, "_param_index"):
            index: dict[str, list[tuple[AxisRef, Slot]]] = {}
            for slot in self.slots.values():
                for ref in slot.axes:
                    index.setdefault(ref.param, []).append((ref, slot))
            self._param_index = index
        return self._param_index

    def check_model(self, model: nn.Module, which: str = "model") -> dict[str, torch.Tensor]:
        """The model's floating parameters by name; raises naming the first tensor that is missing,
        extra or of another shape than the spec expects."""
        params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
        for name, shape in self.shapes.items():
            if name not in params:
                raise ArchitectureMismatchError(
                    f"Tensor {name!r} of the {self.architecture} permutation spec is missing from the {which} "
                    f"({type(model).__name__}). Align models of one architecture and configuration."
                )
            if tuple(params[name].shape) != shape:
                raise ArchitectureMismatchError(
                    f"Tensor {name!r} has shape {tuple(params[name].shape)} in the {which} but {shape} in the "
                    "permutation spec: the models' configurations differ (hidden size, heads, layers, labels)."
                )
        extra = [n for n in params if n not in self.shapes]
        if extra:
            raise ArchitectureMismatchError(
                f"Tensor {extra[0]!r} of the {which} is not in the permutation spec: the models' configurations "
                "differ. Align models of one architecture and configuration."
            )
        return params

    def check_permutation(self, perm: Permutation) -> None:
        """Raise unless ``perm`` has a valid permutation for every slot, heads kept whole."""
        for group in self.groups:
            head_maps = []
            for slot in group.slots:
                if slot.name not in perm:
                    raise ArchitectureMismatchError(f"The permutation has no entry for slot {slot.name!r}.")
                p = torch.as_tensor(perm[slot.name]).cpu()
                if p.shape != (slot.size,) or not torch.equal(p.sort().values, torch.arange(slot.size)):
                    raise ArchitectureMismatchError(
                        f"perm[{slot.name!r}] is not a permutation of {slot.size} units (shape {tuple(p.shape)})."
                    )
                if group.num_heads > 1:
                    blocks = (p // group.head_dim).view(group.num_heads, group.head_dim)
                    if not (blocks == blocks[:, :1]).all():
                        raise ArchitectureMismatchError(
                            f"perm[{slot.name!r}] moves units between attention heads: heads must stay whole."
                        )
                    head_maps.append(blocks[:, 0])
            if any(not torch.equal(h, head_maps[0]) for h in head_maps[1:]):
                raise ArchitectureMismatchError(
                    f"The slots of {group.name!r} relabel the heads differently: queries, keys and values must "
                    "move with their head."
                )
