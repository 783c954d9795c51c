"""What an alignment may relabel: the tensor axes that share one permutation of hidden units.

A ``PermutationSpec`` is a list of ``PermutationGroup``s. A group holds one or more ``Slot``s;
a slot is one permutation of ``size`` units, applied to every axis it lists (``AxisRef``) and
read from every module output it lists (``ActivationRef``, for activation matching).

A group whose slots have a ``kind`` other than ``plain`` is an attention layer: its slots
(query/key dimensions, value dimensions, per-head tables) are cut into head blocks that are
relabelled together in every slot, with one permutation of the dimensions inside each head per
kind (``attention_layout.py`` has the whole symmetry, grouped-query attention and rotary
dimensions included).

A ``Permutation`` maps slot name -> LongTensor ``p`` of the slot's size: unit ``i`` of the
permuted model is unit ``p[i]`` of the original (``W'[i] = W[p[i]]`` along every listed axis).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import ArchitectureMismatchError
from .attention_layout import SLOT_KINDS, decompose

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
    kind: str = "plain"  # or an attention kind of attention_layout.SLOT_KINDS


@dataclass
class PermutationGroup:
    """Slots that are solved together: one plain slot, or the slots of one attention layer
    with ``num_heads`` query heads in ``kv_heads`` key/value groups (default: as many), the first
    ``fixed_qk`` query/key dimensions of each head kept in place (rotary)."""

    name: str
    slots: list[Slot]
    num_heads: int = 1
    kv_heads: int | None = None
    fixed_qk: int = 0

    @property
    def attention(self) -> bool:
        return any(slot.kind != "plain" for slot in self.slots)

    @property
    def key_value_heads(self) -> int:
        return self.kv_heads or self.num_heads

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.key_value_heads

    def unit(self, slot: Slot) -> int:
        """Units of ``slot`` per head block (its head dimension; 1 for a per-head table)."""
        if slot.kind == "plain":
            return slot.size
        per_query, _ = SLOT_KINDS[slot.kind]
        return slot.size // (self.num_heads if per_query else self.key_value_heads)

    def dims(self) -> dict[str, int]:
        """Head dimension of each within-head permutation (``qk``, ``v``) the group has."""
        return {SLOT_KINDS[s.kind][1]: self.unit(s) for s in self.slots if s.kind != "plain" and SLOT_KINDS[s.kind][1]}

    @property
    def head_dim(self) -> int:
        """The query/key head dimension (the value one where there is none)."""
        dims = self.dims()
        return dims.get("qk", dims.get("v", self.slots[0].size))


@dataclass
class PermutationSpec:
    """Every permutation symmetry of one architecture, derived from a model instance.

    ``shapes`` lists every floating-point parameter the spec was derived from (permuted or not):
    a model to be permuted or matched must have exactly these tensors. ``outputs`` names the
    model outputs that carry hidden units (a base model's ``last_hidden_state``: slot
    ``residual``); every other output is unchanged by a permutation.
    """

    architecture: str
    groups: list[PermutationGroup]
    shapes: dict[str, tuple[int, ...]]
    outputs: dict[str, str] = field(default_factory=dict)

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
        """Raise unless ``perm`` has a valid permutation for every slot, within each attention
        group's symmetry (heads whole, query heads with their key/value group, rotary dims fixed)."""
        for group in self.groups:
            for slot in group.slots:
                if slot.name not in perm:
                    raise ArchitectureMismatchError(f"The permutation has no entry for slot {slot.name!r}.")
                p = torch.as_tensor(perm[slot.name]).cpu()
                if p.shape != (slot.size,) or not torch.equal(p.sort().values, torch.arange(slot.size)):
                    raise ArchitectureMismatchError(
                        f"perm[{slot.name!r}] is not a permutation of {slot.size} units (shape {tuple(p.shape)})."
                    )
            if group.attention:
                decompose(group, perm)
