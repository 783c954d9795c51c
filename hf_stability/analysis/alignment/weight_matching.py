"""Weight matching (Ainsworth et al. 2023, "Git Re-Basin"): permute model b towards model a by
maximising sum over tensors of <W_a, P(W_b)>, one permutation group at a time."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from ..compare import check_same_architecture
from .assignment import MatchingResult, assignment_value, solve_group
from .permute import identity_permutation, permute_tensor
from .spec import AxisRef, Permutation, PermutationGroup, PermutationSpec, Slot
from .specs import permutation_spec

logger = logging.getLogger(__name__)


def _is_direct(ref: AxisRef, spec: PermutationSpec) -> bool:
    """Whether the tensor has no permuted axis but this one (an embedding, a norm, a bias): its
    cost does not depend on any other group's permutation."""
    return all(other.axis == ref.axis for other, _ in spec.axes_of(ref.param))


def _is_known(ref: AxisRef, spec: PermutationSpec, known: set[str]) -> bool:
    """Whether every other permuted axis of the tensor belongs to a slot in ``known``."""
    return all(other.axis == ref.axis or slot.name in known for other, slot in spec.axes_of(ref.param))


def _owns_a_table(group: PermutationGroup, spec: PermutationSpec) -> bool:
    """Whether a tensor of two or more axes is permuted by this group alone (an embedding table)."""
    return any(
        len(spec.shapes[ref.param]) >= 2 and _is_direct(ref, spec) for slot in group.slots for ref in slot.axes
    )


def slot_cost(slot: Slot, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], spec: PermutationSpec,
               perm: Permutation, known: set[str] | None = None) -> torch.Tensor:
    """cost[i, j] = sum over the slot's axes of <unit i of a, unit j of b>, every other axis of b
    permuted by the current ``perm``: one matrix product per tensor, on the tensors' device.
    ``known``: only the tensors whose other axes all belong to these slots (already solved)."""
    cost = torch.zeros(slot.size, slot.size, dtype=torch.float64, device=next(iter(a.values())).device)
    for ref in slot.axes:
        if known is not None and not _is_known(ref, spec, known):
            continue
        wa = a[ref.param].narrow(ref.axis, ref.start, slot.size).movedim(ref.axis, 0).reshape(slot.size, -1)
        wb = permute_tensor(b[ref.param], ref.param, spec, perm, skip=(ref.axis, ref.start))
        wb = wb.narrow(ref.axis, ref.start, slot.size).movedim(ref.axis, 0).reshape(slot.size, -1)
        cost += (wa @ wb.T).double()
    return cost


def _total(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], spec: PermutationSpec, perm: Permutation) -> float:
    device = next(iter(a.values())).device
    on_device = {name: p.to(device) for name, p in perm.items()}
    return float(sum((a[n].double() * permute_tensor(b[n], n, spec, on_device).double()).sum() for n in a))


def _independent_runs(order: list[int], tensors: list[set[str]]) -> list[list[int]]:
    """Cut a visiting order of groups into runs of consecutive groups that share no tensor. A
    group's costs depend only on the groups it shares tensors with, so a run can be solved at
    once (its assignment problems in parallel) with the result of visiting it group by group."""
    runs: list[list[int]] = []
    seen: set[str] = set()
    for i in order:
        if not runs or tensors[i] & seen:
            runs.append([])
            seen = set()
        runs[-1].append(i)
        seen |= tensors[i]
    return runs


@torch.no_grad()
def objective(a: nn.Module, b: nn.Module, perm: Permutation, spec: PermutationSpec | None = None) -> float:
    """sum over the spec's permuted tensors of <W_a, P(W_b)>: what weight matching maximises."""
    spec = spec or permutation_spec(a)
    pa, pb = spec.check_model(a, "first model"), spec.check_model(b, "second model")
    involved = [n for n in spec.shapes if spec.axes_of(n)]
    return _total({n: pa[n] for n in involved}, {n: pb[n] for n in involved}, spec, perm)


@torch.no_grad()
def weight_matching(
    a: nn.Module,
    b: nn.Module,
    spec: PermutationSpec | None = None,
    *,
    max_iter: int = 100,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> MatchingResult:
    """The permutation of ``b``'s hidden units that best matches ``a``'s weights.

    Coordinate ascent: the groups that own an embedding table (the residual stream) are first
    solved from the tensors only they permute, then the others outwards from them (each from
    the tensors linking it to groups already solved); then each sweep visits the groups in a random
    order (from ``seed``) and solves each group's linear assignment problem with the others
    held fixed (skipping groups none of whose neighbours changed since they were last solved);
    it stops after a sweep in which no group improved, or after ``max_iter`` sweeps. Cost
    matrices are built with matrix products on ``device`` (default: CUDA when available); the
    assignment problems are solved by scipy on the CPU, those of consecutive groups that share
    no tensor in parallel threads (the same result as one at a time). Apply the result with
    ``apply_permutation(b, result.permutation)``.
    """
    started = time.perf_counter()
    check_same_architecture(a, b)
    spec = spec or permutation_spec(a)
    params_a, params_b = spec.check_model(a, "first model"), spec.check_model(b, "second model")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    involved = [n for n in spec.shapes if spec.axes_of(n)]
    wa = {n: params_a[n].detach().to(device, torch.float32) for n in involved}
    wb = {n: params_b[n].detach().to(device, torch.float32) for n in involved}
    perm = {name: p.to(device) for name, p in identity_permutation(spec).items()}
    rng = np.random.default_rng(seed)
    iterations, converged = 0, False
    workers = max(1, min(16, os.cpu_count() or 1))
    tensors = [{ref.param for slot in g.slots for ref in slot.axes} for g in spec.groups]
    neighbours = [{j for j, other in enumerate(tensors) if j != i and mine & other} for i, mine in enumerate(tensors)]
    # A group's costs change only when a neighbour's permutation does: re-solving it otherwise
    # would give the same answer, so only "stale" groups are solved (the result is unchanged).
    stale = set(range(len(spec.groups)))

    host_perm = {name: p.cpu() for name, p in perm.items()}
    pinned: dict[tuple, torch.Tensor] = {}  # page-locked buffers by (group in run, slot in group, shape)

    def to_host(costs: list[dict[str, torch.Tensor]]) -> list[dict[str, np.ndarray]]:
        """The cost matrices on the host, as float32 (half the bytes; the assignment values are
        summed in float64): on CUDA through page-locked buffers, copied without a sync each and
        waited for once."""
        if device.type != "cuda":
            return [{name: c.float().numpy() for name, c in group.items()} for group in costs]
        out = []
        for n, group in enumerate(costs):
            host = {}
            for j, (name, c) in enumerate(group.items()):
                key = (n, j, tuple(c.shape))
                buffer = pinned.get(key)
                if buffer is None:
                    buffer = pinned[key] = torch.empty(c.shape, dtype=torch.float32, pin_memory=True)
                buffer.copy_(c.float(), non_blocking=True)
                host[name] = buffer
            out.append(host)
        torch.cuda.current_stream(device).synchronize()
        return [{name: b.numpy() for name, b in group.items()} for group in out]

    def visit(run: list[int], known: set[str] | None) -> int:
        """Solve groups that share no tensor (in parallel); keep each solution that improves."""
        groups = [spec.groups[i] for i in run]
        costs = to_host([{s.name: slot_cost(s, wa, wb, spec, perm, known) for s in g.slots} for g in groups])
        improved = 0
        for i, group, cost, proposal in zip(run, groups, costs, pool.map(solve_group, groups, costs)):
            stale.discard(i)
            before = assignment_value(cost, {slot.name: host_perm[slot.name] for slot in group.slots})
            if assignment_value(cost, proposal) > before + 1e-9 * max(1.0, abs(before)):
                perm.update({name: p.to(device) for name, p in proposal.items()})
                host_perm.update(proposal)
                stale.update(neighbours[i])
                improved += 1
        return improved

    def chunks(run: list[int]) -> list[list[int]]:
        return [run[i : i + workers] for i in range(0, len(run), workers)]

    with ThreadPoolExecutor(max_workers=workers) as pool:  # scipy's solver releases the GIL
        # Start with the groups that own a table no other group permutes (token, position and
        # patch embeddings: the residual stream), solved from their own tensors, so that the
        # first sweep does not lock in assignments made against an unaligned residual stream.
        anchored = [i for i, g in enumerate(spec.groups) if _owns_a_table(g, spec)]
        for run in chunks(anchored):
            visit(run, known=set())
        # Then outwards from them: each group solved from the tensors that link it to groups
        # already solved (an embedding projection, then the layers reading the stream), so that
        # no group starts from an assignment made against unaligned neighbours.
        solved = {slot.name for i in anchored for slot in spec.groups[i].slots}
        remaining = [i for i in range(len(spec.groups)) if i not in anchored]
        while remaining:
            ready = [i for i in remaining if any(not _is_direct(ref, spec) and _is_known(ref, spec, solved)
                                                 for slot in spec.groups[i].slots for ref in slot.axes)]
            if not ready:
                break
            for run in chunks(ready):  # they share only tensors of unsolved slots, which are not read
                visit(run, known=solved)
            solved |= {slot.name for i in ready for slot in spec.groups[i].slots}
            remaining = [i for i in remaining if i not in ready]
        stale = set(range(len(spec.groups)))
        while iterations < max_iter:
            iterations += 1
            improved = 0
            for whole in _independent_runs([int(i) for i in rng.permutation(len(spec.groups))], tensors):
                for run in chunks([i for i in whole if i in stale]):
                    improved += visit(run, known=None)
            logger.debug("weight matching sweep %d: %d of %d groups improved", iterations, improved, len(spec.groups))
            if not improved:
                converged = True
                break
    if not converged:
        logger.warning("Weight matching stopped after max_iter=%d sweeps before converging.", max_iter)
    perm = {name: p.cpu() for name, p in perm.items()}
    value = _total(wa, wb, spec, perm)
    return MatchingResult(perm, "weight", time.perf_counter() - started, iterations, converged, value)
