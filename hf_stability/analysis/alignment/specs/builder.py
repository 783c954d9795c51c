"""SpecBuilder: collects the slots of a permutation spec while an architecture's rules walk the
model, and checks at the end that every floating parameter was covered by some rule."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ....errors import UnsupportedArchitectureError
from ..spec import AxisRef, PermutationGroup, PermutationSpec, Slot
from .registry import supported_architectures


@dataclass
class AttentionSlots:
    """The slots of one attention layer: query rows, key rows, value rows, output columns and the
    per-head tables (None when the layer has none)."""

    q: Slot
    k: Slot
    v: Slot
    o: Slot
    head: Slot | None = None


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
        """Multi-head attention with ``size`` query/key and value units: the (qk, v) slots."""
        slots = self.attention(name, num_heads, num_heads, size // max(num_heads, 1), size // max(num_heads, 1))
        return slots.k, slots.v

    def attention(self, name: str, num_heads: int, kv_heads: int, qk_dim: int, v_dim: int, *,
                  fixed_qk: int = 0, head_table: bool = False) -> AttentionSlots:
        """An attention layer of ``num_heads`` query heads over ``kv_heads`` key/value heads (see
        attention_layout.py). With one query head per key/value head, queries share the keys'
        slot and output columns the values' (``q is k``, ``o is v``)."""
        if num_heads < 1 or kv_heads < 1 or num_heads % kv_heads or qk_dim < 1 or v_dim < 1:
            raise UnsupportedArchitectureError(
                f"{self.architecture}: {name} has {num_heads} query heads over {kv_heads} key/value heads "
                f"(head dimensions {qk_dim}, {v_dim}): they do not form a grouped attention layer."
            )
        k, v = Slot(f"{name}.qk", kv_heads * qk_dim, kind="qk"), Slot(f"{name}.v", kv_heads * v_dim, kind="v")
        q, o = k, v
        slots = [k, v]
        if num_heads != kv_heads:
            q, o = Slot(f"{name}.q", num_heads * qk_dim, kind="q"), Slot(f"{name}.o", num_heads * v_dim, kind="o")
            slots += [q, o]
        head = Slot(f"{name}.heads", num_heads, kind="head") if head_table else None
        if head is not None:
            slots.append(head)
        self.groups.append(PermutationGroup(name, slots, num_heads=num_heads, kv_heads=kv_heads,
                                            fixed_qk=min(fixed_qk, qk_dim)))
        return AttentionSlots(q, k, v, o, head)

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

    def linear(self, name: str, inputs: Slot | None, outputs: Slot | None, out_start: int = 0,
               in_start: int = 0) -> None:
        """A Linear layer (or transformers' Conv1D, whose weight is stored transposed): inputs
        permute weight columns, outputs permute rows and the bias."""
        transposed = type(self.modules.get(name)).__name__ == "Conv1D"
        in_axis, out_axis = (0, 1) if transposed else (1, 0)
        if inputs is not None:
            self.axis(f"{name}.weight", in_axis, inputs, in_start)
        if outputs is not None:
            self.axis(f"{name}.weight", out_axis, outputs, out_start)
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

    def finish(self, outputs: dict[str, str] | None = None) -> PermutationSpec:
        missing = [n for n in self.params if n not in self.covered]
        if missing:
            raise UnsupportedArchitectureError(
                f"Parameter {missing[0]!r} of this {self.architecture} is not covered by its permutation spec: this "
                f"variant is not supported. Supported: {supported_architectures()}."
            )
        shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        return PermutationSpec(self.architecture, self.groups, shapes, outputs or {})
