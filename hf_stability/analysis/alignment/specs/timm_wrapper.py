"""transformers' TimmWrapperForImageClassification: a timm model saved and loaded with
``from_pretrained``. Its spec is the wrapped timm model's (timm_vit.py), under the wrapper's
``timm_model.`` prefix."""

from __future__ import annotations

from torch import nn

from ....errors import UnsupportedArchitectureError
from ....hints import setting
from ..spec import ActivationRef, AxisRef, PermutationGroup, PermutationSpec, Slot
from .registry import FAMILIES, register_spec, supported_architectures

PREFIX = "timm_model."


def _is_timm_wrapper(model: nn.Module) -> bool:
    return type(model).__name__.startswith("TimmWrapper") and isinstance(getattr(model, "timm_model", None), nn.Module)


def prefixed(spec: PermutationSpec, prefix: str, architecture: str) -> PermutationSpec:
    """The same spec with every parameter and module name under ``prefix``."""
    groups = [
        PermutationGroup(
            group.name,
            [Slot(slot.name, slot.size,
                  axes=[AxisRef(prefix + a.param, a.axis, a.start) for a in slot.axes],
                  activations=[ActivationRef(prefix + r.module, r.start) for r in slot.activations],
                  kind=slot.kind)
             for slot in group.slots],
            num_heads=group.num_heads, kv_heads=group.kv_heads, fixed_qk=group.fixed_qk,
        )
        for group in spec.groups
    ]
    shapes = {prefix + name: shape for name, shape in spec.shapes.items()}
    outputs = {"logits" if field == "output" else field: slot for field, slot in spec.outputs.items()}
    return PermutationSpec(architecture, groups, shapes, outputs)


@register_spec("transformers TimmWrapperForImageClassification around a supported timm model", _is_timm_wrapper)
def timm_wrapper_spec(model: nn.Module) -> PermutationSpec:
    inner = model.timm_model
    for family in FAMILIES:
        if family.build is not timm_wrapper_spec and family.matches(inner):
            spec = family.build(inner)
            return prefixed(spec, PREFIX, f"TimmWrapper({spec.architecture})")
    raise UnsupportedArchitectureError(
        f"TimmWrapper around {type(inner).__name__}: no permutation spec for the wrapped timm model. Supported: "
        f"{supported_architectures()}. Analyse with {setting('alignment', 'none')} to skip alignment."
    )
