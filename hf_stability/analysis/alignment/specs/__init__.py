"""permutation_spec(model): the PermutationSpec of a supported architecture, derived from the
model itself and checked numerically on it once (``numeric_check.py``). One file per
architecture family registers its builder (``registry.py``); transformers models built from
the common parts need none (``common_parts.py``)."""

from __future__ import annotations

from torch import nn

from ....errors import UnsupportedArchitectureError
from ....hints import setting
from ..spec import PermutationSpec
from . import swin, timm_vit, timm_wrapper, transformers_models  # noqa: F401  (they register their families)
from .builder import SpecBuilder
from .numeric_check import check_spec
from .registry import FAMILIES, register_spec, supported_architectures
from .transformers_models import BERT_LAYOUT_TYPES


def permutation_spec(model: nn.Module, check: bool = True) -> PermutationSpec:
    """The PermutationSpec of ``model``'s architecture, checked numerically on ``model`` unless
    ``check=False``; raises UnsupportedArchitectureError listing the supported ones otherwise."""
    for family in FAMILIES:
        if family.matches(model):
            spec = family.build(model)
            if check:
                check_spec(model, spec, family.description)
            return spec
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise UnsupportedArchitectureError(
        f"No permutation spec for {type(model).__name__}"
        + (f" (model_type {model_type!r})" if model_type else "")
        + f". Supported: {supported_architectures()}. Analyse with {setting('alignment', 'none')} to skip alignment."
    )


__all__ = [
    "BERT_LAYOUT_TYPES", "FAMILIES", "SpecBuilder", "permutation_spec", "register_spec", "supported_architectures",
]
