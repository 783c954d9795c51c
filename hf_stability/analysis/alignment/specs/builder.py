"""SpecBuilder: collects the slots of a permutation spec while an architecture's rules walk the
model, and checks at the end that every floating parameter was covered by some rule."""

from __future__ import annotations

from torch import nn

from ....errors import UnsupportedArchitectureError
from ..spec import AxisRef, PermutationGroup, PermutationSpec, Slot
from .registry import supported_architectures


class SpecBuilder:
    """Collects slots and checks that every floating parameter of the model is covered."""

    def __init__(self, model: nn.Module, architecture: str):
        self.model = model
        self.architecture = architecture
        self.params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
        self.modules = dict(model.named_modules())
        self.groups: list[PermutationGroup] = []
        self.covered: set[str] = set()

    def plain(self, name: str, size: int) -> Slot:
        slot = Slot(name, size)
        self.groups.append(PermutationGroup(name, [slot]))
        return slot

    def heads(self, name: str, size: int, num_heads: int) -> tuple[Slot, Slot]:
        if num_heads < 1 or size % num_heads:
            raise UnsupportedArchitectureError(
                f"{name}: {size} attention units do not split into {num_heads} heads of equal size."
            )
        qk, v = Slot(f"{name}.qk", size), Slot(f"{name}.v", size)
        self.groups.append(PermutationGroup(name, [qk, v], num_heads=num_heads))
        return qk, v

    def axis(self, param: str, axis: int, slot: Slot, start: int = 0) -> None:
        if param not in self.params:
            raise UnsupportedArchitectureError(f"{self.architecture}: expected a parameter {param!r}; none exists.")
        if self.params[param].shape[axis] < start + slot.size:
            raise UnsupportedArchitectureError(
                f"{self.architecture}: {param!r} has {self.params[param].shape[axis]} entries on axis {axis}, "
                f"fewer than slot {slot.name!r} needs ({start} + {slot.size})."
            )
        slot.axes.append(AxisRef(param, axis, start))
        self.covered.add(param)

    def unpermuted(self, param: str) -> None:
        """A parameter without hidden-unit axes (a classifier's bias)."""
        if param in self.params:
            self.covered.add(param)

    def module(self, name: str) -> nn.Module | None:
        return self.modules.get(name)

    def linear(self, name: str, inputs: Slot | None, outputs: Slot | None, out_start: int = 0) -> None:
        """A Linear layer: inputs permute weight columns, outputs permute rows and the bias."""
        if inputs is not None:
            self.axis(f"{name}.weight", 1, inputs)
        if outputs is not None:
            self.axis(f"{name}.weight", 0, outputs, out_start)
            if f"{name}.bias" in self.params:
                self.axis(f"{name}.bias", 0, outputs, out_start)
        else:
            self.covered.add(f"{name}.weight")
            self.unpermuted(f"{name}.bias")

    def norm(self, name: str, slot: Slot) -> None:
        """A LayerNorm over the slot's units (permutation-equivariant)."""
        for suffix in ("weight", "bias"):
            if f"{name}.{suffix}" in self.params:
                self.axis(f"{name}.{suffix}", 0, slot)

    def finish(self) -> PermutationSpec:
        missing = [n for n in self.params if n not in self.covered]
        if missing:
            raise UnsupportedArchitectureError(
                f"Parameter {missing[0]!r} of this {self.architecture} is not covered by its permutation spec: this "
                f"variant is not supported. Supported: {supported_architectures()}."
            )
        shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        return PermutationSpec(self.architecture, self.groups, shapes)
