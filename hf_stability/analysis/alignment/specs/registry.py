"""The registry of permutation-spec builders: one file per architecture family registers itself
here, so adding an architecture is one new file in this folder (imported in ``__init__.py``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..spec import PermutationSpec


@dataclass(frozen=True)
class SpecFamily:
    """An architecture family: which models it covers and how their spec is derived."""

    description: str
    matches: Callable[[nn.Module], bool]
    build: Callable[[nn.Module], PermutationSpec]


FAMILIES: list[SpecFamily] = []


def register_spec(description: str, matches: Callable[[nn.Module], bool]):
    """Decorator: register ``build(model) -> PermutationSpec`` for the models ``matches`` accepts."""

    def decorate(build: Callable[[nn.Module], PermutationSpec]) -> Callable[[nn.Module], PermutationSpec]:
        FAMILIES.append(SpecFamily(description, matches, build))
        return build

    return decorate


def supported_architectures() -> str:
    return "; ".join(family.description for family in FAMILIES)
