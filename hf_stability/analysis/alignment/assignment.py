"""The linear assignment problems of one permutation group, and what a matching returns.

A group's costs are one matrix per slot, ``cost[i, j]`` = how well unit i of model a matches
unit j of model b (larger is better). A plain group is one assignment problem. An attention
group is solved for its key/value heads, query heads and within-head permutations together:
for every pair of key/value heads (g of a, h of b) the query heads are assigned on the best
value each pair of them could reach, then the within-head permutations shared by the group are
solved given that assignment, and the key/value heads are finally assigned on the values of
those pairs. Without grouped-query attention (one query head per key/value head) this is the
exact optimum of the group's problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .attention_layout import SLOT_KINDS, HeadPermutation, compose
from .spec import Permutation, PermutationGroup


def linear_sum_assignment(cost: Any, maximize: bool = False) -> tuple[Any, Any]:
    """scipy's Hungarian solver, imported on first use (scipy.optimize takes half a second to
    import: an analysis that does not align should not wait for it)."""
    from scipy.optimize import linear_sum_assignment as solve

    return solve(cost, maximize=maximize)


def _within(cost: np.ndarray, fixed: int) -> np.ndarray:
    """The best permutation of a head's dimensions, the first ``fixed`` kept in place."""
    cols = np.arange(len(cost))
    if fixed < len(cost):
        _, rest = linear_sum_assignment(cost[fixed:, fixed:], maximize=True)
        cols[fixed:] = rest + fixed
    return cols


def _best(costs: np.ndarray, fixed: int) -> tuple[np.ndarray, np.ndarray]:
    """For a stack of square cost matrices [..., d, d]: the best within-head permutation of each
    (the first ``fixed`` dimensions in place) and its value. Fixed dimensions are read off the
    diagonals at once; only the free ones need an assignment problem each."""
    d = costs.shape[-1]
    lead = costs.shape[:-2]
    values = np.einsum("...ii->...", costs[..., :fixed, :fixed]) if fixed else np.zeros(lead)
    cols = np.broadcast_to(np.arange(d), (*lead, d)).copy()
    if fixed < d:
        flat_costs, flat_cols = costs.reshape(-1, d, d), cols.reshape(-1, d)
        flat_values = values.reshape(-1)
        for n in range(len(flat_costs)):
            chosen = _within(flat_costs[n], fixed)
            flat_cols[n] = chosen
            flat_values[n] += flat_costs[n][np.arange(fixed, d), chosen[fixed:]].sum()
    return cols, values


def _solve_attention(group: PermutationGroup, costs: dict[str, np.ndarray]) -> Permutation:
    g, r = group.key_value_heads, group.queries_per_kv
    fixed = {"qk": group.fixed_qk, "v": 0}
    blocks = {}  # slot -> [g_a, g_b, j_a, j_b, i, k], contiguous
    for slot in group.slots:
        per_query, _ = SLOT_KINDS[slot.kind]
        copies, unit = (r if per_query else 1), group.unit(slot)
        blocks[slot.name] = np.ascontiguousarray(
            costs[slot.name].reshape(g, copies, unit, g, copies, unit).transpose(0, 3, 1, 4, 2, 5))
    rows, cols_g = np.arange(g)[:, None, None], np.arange(g)[None, :, None]
    query = np.zeros((g, g, r), dtype=np.int64)
    if r > 1:  # query heads, on the value each pair of them could reach with its own dimensions' permutation
        value = np.zeros((g, g, r, r))
        for slot in group.slots:
            per_query, tie = SLOT_KINDS[slot.kind]
            if per_query:
                b = blocks[slot.name]
                value += b[..., 0, 0] if tie is None else _best(b, fixed[tie])[1]
        for ga in range(g):
            for gb in range(g):
                query[ga, gb] = linear_sum_assignment(value[ga, gb], maximize=True)[1]
    pair = np.zeros((g, g))
    chosen_within = {}
    for tie, dim in group.dims().items():  # the within-head permutations, given the query heads
        shared = np.zeros((g, g, dim, dim))
        for slot in group.slots:
            per_query, slot_tie = SLOT_KINDS[slot.kind]
            if slot_tie == tie:
                b = blocks[slot.name]
                shared += b[rows, cols_g, np.arange(r), query].sum(2) if per_query else b[:, :, 0, 0]
        chosen_within[tie], values = _best(shared, fixed[tie])
        pair += values
    for slot in group.slots:
        if slot.kind == "head":
            pair += blocks[slot.name][rows, cols_g, np.arange(r), query][..., 0, 0].sum(2)
    _, kv = linear_sum_assignment(pair, maximize=True)
    heads = np.arange(g)
    hp = HeadPermutation(
        torch.from_numpy(kv), torch.from_numpy(query[heads, kv].copy()),
        {tie: torch.from_numpy(w[heads, kv].copy()) for tie, w in chosen_within.items()},
    )
    return compose(group, hp)


def solve_group(group: PermutationGroup, costs: dict[str, np.ndarray]) -> Permutation:
    """The permutation of every slot of ``group`` that maximises the summed costs."""
    if group.attention:
        return _solve_attention(group, costs)
    total = sum(costs[slot.name] for slot in group.slots)
    _, cols = linear_sum_assignment(total, maximize=True)
    return {slot.name: torch.from_numpy(cols) for slot in group.slots}


def assignment_value(costs: dict[str, np.ndarray], perm: Permutation) -> float:
    """Sum over slots of cost[i, perm[i]]."""
    return float(sum(c[np.arange(len(c)), perm[name].numpy()].sum(dtype=np.float64) for name, c in costs.items()))


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
