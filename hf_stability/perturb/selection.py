"""Which parameters, and which entries of them, a perturbation touches."""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import NoMatchingParametersError


def select_parameters(
    model: nn.Module, include: list[str], exclude: list[str], trainable_only: bool = False
) -> dict[str, nn.Parameter]:
    """Floating-point parameters whose name matches an include pattern (all when none is given)
    and no exclude pattern, in the model's own order; with ``trainable_only``, only those that
    train (``requires_grad``: a frozen weight perturbed never trains again, and an adapter
    checkpoint does not even save it). Raises when a pattern matches no parameter or nothing is
    selected."""
    floating = {name: p for name, p in model.named_parameters()
                if p.is_floating_point() and (p.requires_grad or not trainable_only)}
    if not floating:
        raise NoMatchingParametersError(
            f"The {type(model).__name__} has no trainable floating-point parameter to perturb: unfreeze some, or "
            "perturb frozen ones with trainable_only=False."
        )
    example = ", ".join(list(floating)[:4])
    # every pattern must match something: a mistyped exclude would silently perturb what it was meant to spare
    unmatched = [pat for pat in [*include, *exclude] if not any(re.search(pat, name) for name in floating)]
    if unmatched:
        raise NoMatchingParametersError(
            f"The patterns {unmatched} (of include={include}, exclude={exclude}) match no parameter of "
            f"{type(model).__name__}: fix or remove them. Parameter names look like: {example}, ..."
        )
    included = {
        name: p for name, p in floating.items() if not include or any(re.search(pat, name) for pat in include)
    }
    selected = {name: p for name, p in included.items() if not any(re.search(pat, name) for pat in exclude)}
    if not selected:
        raise NoMatchingParametersError(
            f"The exclude patterns {exclude} remove every parameter selected by include={include or 'all'}. "
            f"Parameter names look like: {example}, ..."
        )

    return selected


def _distinct_indices(total: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct integers in [0, total), sorted. Uses rejection for small k, a permutation otherwise."""
    if k > total:
        raise NoMatchingParametersError(
            f"num_entries={k} is larger than the {total} entries selected; lower it or widen include."
        )
    if k * 8 >= total:
        return torch.randperm(total, generator=generator)[:k].sort().values
    chosen: list[int] = []
    seen: set[int] = set()
    while len(chosen) < k:
        draws = torch.randint(0, total, (2 * (k - len(chosen)),), generator=generator).tolist()
        for value in draws:
            if value not in seen:
                seen.add(value)
                chosen.append(value)
                if len(chosen) == k:
                    break
    return torch.tensor(sorted(chosen), dtype=torch.long)


def choose_entries(
    sizes: dict[str, int],
    generator: torch.Generator,
    fraction: float | None = None,
    num_entries: int | None = None,
) -> dict[str, torch.Tensor | None]:
    """Flat indices of the entries to perturb in each tensor (None: every entry).

    ``fraction`` keeps each entry independently with that probability; ``num_entries`` picks
    exactly that many entries uniformly over all selected tensors together.
    """
    if fraction is None and num_entries is None:
        return {name: None for name in sizes}
    if fraction is not None:
        if fraction >= 1.0:
            return {name: None for name in sizes}
        return {
            name: torch.nonzero(torch.rand(n, generator=generator) < fraction).flatten() for name, n in sizes.items()
        }
    total = sum(sizes.values())
    flat = _distinct_indices(total, int(num_entries), generator)
    chosen: dict[str, torch.Tensor | None] = {}
    start = 0
    for name, n in sizes.items():
        lo = torch.searchsorted(flat, start)
        hi = torch.searchsorted(flat, start + n)
        chosen[name] = flat[lo:hi] - start
        start += n
    return chosen
