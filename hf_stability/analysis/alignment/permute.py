"""Make, apply and check permutations of a PermutationSpec."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .attention_layout import compose, random_head_permutation
from .spec import Permutation, PermutationSpec
from .specs import permutation_spec


def identity_permutation(spec: PermutationSpec) -> Permutation:
    """Every unit stays where it is."""
    return {name: torch.arange(slot.size) for name, slot in spec.slots.items()}


def random_permutation(spec: PermutationSpec, generator: torch.Generator | None = None) -> Permutation:
    """A uniformly random element of the spec's symmetry (attention heads relabelled as wholes,
    within their key/value group, rotary dimensions in place). Seed it with ``generator`` for a
    reproducible draw; the global RNG is not touched when one is given."""
    perm: Permutation = {}
    for group in spec.groups:
        if group.attention:
            perm.update(compose(group, random_head_permutation(group, generator)))
        else:
            perm.update({slot.name: torch.randperm(slot.size, generator=generator) for slot in group.slots})
    return perm


def _full_index(length: int, segments: list[tuple[int, torch.Tensor]], device: torch.device) -> torch.Tensor:
    index = torch.arange(length, device=device)
    for start, p in segments:
        index[start : start + len(p)] = p.to(device) + start
    return index


def permute_tensor(
    tensor: torch.Tensor,
    name: str,
    spec: PermutationSpec,
    perm: Permutation,
    skip: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``tensor`` (the parameter ``name``) with every permuted axis reordered; ``skip`` =
    (axis, start) leaves that one segment as it is (weight matching reads it raw)."""
    by_axis: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for ref, slot in spec.axes_of(name):
        if skip is not None and (ref.axis, ref.start) == skip:
            continue
        by_axis.setdefault(ref.axis, []).append((ref.start, perm[slot.name]))
    for axis, segments in by_axis.items():
        tensor = tensor.index_select(axis, _full_index(tensor.shape[axis], segments, tensor.device))
    return tensor


def permute_state(state: dict[str, torch.Tensor], spec: PermutationSpec, perm: Permutation) -> dict[str, torch.Tensor]:
    """A new state dict with ``perm`` applied (tensors the spec does not permute are shared)."""
    return {name: permute_tensor(tensor, name, spec, perm) for name, tensor in state.items()}


def apply_permutation(
    model: nn.Module, perm: Permutation, spec: PermutationSpec | None = None, in_place: bool = False
) -> nn.Module:
    """A permuted copy of ``model``: the same function (up to float rounding), hidden units
    relabelled. ``model`` itself is left unchanged, unless ``in_place``: then its own weights
    are permuted (one tensor at a time, no second copy of the model) and it is returned."""
    spec = spec or permutation_spec(model)
    params = spec.check_model(model)
    spec.check_permutation(perm)
    permuted = model if in_place else copy.deepcopy(model)
    with torch.no_grad():
        for name in params:
            if spec.axes_of(name):
                target = permuted.get_parameter(name)
                target.copy_(permute_tensor(params[name].detach(), name, spec, perm))
    return permuted
