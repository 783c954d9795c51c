"""The linear assignment problems of one permutation group, and what a matching returns.

A group's costs are one matrix per slot, ``cost[i, j]`` = how well unit i of model a matches
unit j of model b (larger is better). A plain group is one assignment problem. An attention
group is solved jointly and exactly for the heads and the permutations inside them: for every
pair of heads (h of a, g of b) the best within-head assignment of every slot is found, and
the heads are then assigned on the sum of those optimal values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .permute import compose_heads
from .spec import Permutation, PermutationGroup


def solve_group(group: PermutationGroup, costs: dict[str, np.ndarray]) -> Permutation:
    """The permutation of every slot of ``group`` that maximises the summed costs."""
    h, d = group.num_heads, group.head_dim
    blocks = {name: c.reshape(h, d, h, d).transpose(0, 2, 1, 3) for name, c in costs.items()}  # [h_a, h_b, i, j]
    value = np.zeros((h, h))
    within = {name: np.empty((h, h, d), dtype=np.int64) for name in costs}
    for a in range(h):
        for b in range(h):
            for name, block in blocks.items():
                rows, cols = linear_sum_assignment(block[a, b], maximize=True)
                within[name][a, b] = cols
                value[a, b] += block[a, b][rows, cols].sum()
    _, heads = linear_sum_assignment(value, maximize=True)
    chosen = {name: torch.from_numpy(w[np.arange(h), heads]) for name, w in within.items()}
    return compose_heads(group, torch.from_numpy(heads), chosen)


def assignment_value(costs: dict[str, np.ndarray], perm: Permutation) -> float:
    """Sum over slots of cost[i, perm[i]]."""
    return float(sum(c[np.arange(len(c)), perm[name].numpy()].sum() for name, c in costs.items()))


@dataclass
class MatchingResult:
    """A permutation that aligns model b to model a, and how it was found."""

    permutation: Permutation
    method: str
    seconds: float
    iterations: int | None = None
    converged: bool = True
    objective: float | None = None

    def to_dict(self) -> dict[str, Any]:
        moved = sum(int((p != torch.arange(len(p))).sum()) for p in self.permutation.values())
        total = sum(len(p) for p in self.permutation.values())
        return {
            "method": self.method,
            "iterations": self.iterations,
            "converged": self.converged,
            "objective": self.objective,
            "units_moved": moved,
            "units": total,
        }
