"""Activation matching (Ainsworth et al. 2023; Li et al. 2015): pair each hidden unit of model b
with the unit of model a whose activations it correlates with best over a data sample."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import UnsupportedArchitectureError
from ..compare import check_same_architecture
from ..evaluation import EvalData, Evaluator
from ..heads import call
from .assignment import MatchingResult, assignment_value, solve_group
from .spec import ActivationRef, PermutationSpec, Slot
from .specs import permutation_spec
from .weight_matching import slot_cost


class _Moments:
    """Additive sums for the correlation of a's and b's units: count, sums, sums of squares and
    the cross products (float64, on the device), so that N processes can reduce them exactly."""

    def __init__(self, size: int, device: torch.device):
        f64 = torch.float64
        self.count = torch.zeros((), dtype=f64, device=device)
        self.sum_a = torch.zeros(size, dtype=f64, device=device)
        self.sum_b = torch.zeros(size, dtype=f64, device=device)
        self.sq_a, self.sq_b = torch.zeros(size, dtype=f64, device=device), torch.zeros(size, dtype=f64, device=device)
        self.cross = torch.zeros(size, size, dtype=f64, device=device)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        self.count += x.shape[0]
        self.sum_a += x.sum(0)
        self.sum_b += y.sum(0)
        self.sq_a += x.pow(2).sum(0)
        self.sq_b += y.pow(2).sum(0)
        self.cross += x.T @ y

    def tensors(self) -> list[torch.Tensor]:
        return [self.count, self.sum_a, self.sum_b, self.sq_a, self.sq_b, self.cross]

    def correlation(self) -> torch.Tensor:
        n = self.count.clamp(min=1)
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        std_a = (self.sq_a / n - mean_a**2).clamp(min=0).sqrt().clamp(min=1e-12)
        std_b = (self.sq_b / n - mean_b**2).clamp(min=0).sqrt().clamp(min=1e-12)
        return (self.cross / n - torch.outer(mean_a, mean_b)) / torch.outer(std_a, std_b)


def _rows(output: Any, ref: ActivationRef, size: int, mask: torch.Tensor | None) -> torch.Tensor:
    """The slot's units from a module output, one row per token (padding dropped) or example."""
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    hidden = hidden[..., ref.start : ref.start + size]
    if mask is not None and hidden.dim() == 3 and hidden.shape[:2] == mask.shape:
        return hidden[mask]
    return hidden.reshape(-1, size)


@torch.no_grad()
def _from_weights(a: nn.Module, b: nn.Module, spec: PermutationSpec, perm: dict[str, torch.Tensor],
                  groups: list) -> dict[str, torch.Tensor]:
    """The groups no activation reads, solved from the weights as in weight matching, every
    other permutation held at its activation-matched value."""
    params_a, params_b = dict(a.named_parameters()), dict(b.named_parameters())
    involved = {ref.param for g in groups for slot in g.slots for ref in slot.axes}
    wa = {n: params_a[n].detach().float().cpu() for n in involved}
    wb = {n: params_b[n].detach().float().cpu() for n in involved}
    current = dict(perm)
    for g in groups:
        current.update({slot.name: torch.arange(slot.size) for slot in g.slots})
    solved = {}
    for g in groups:
        solved.update(solve_group(g, {s.name: slot_cost(s, wa, wb, spec, current).numpy() for s in g.slots}))
    return solved


def _run(model: nn.Module, inputs: dict[str, Any]) -> None:
    """One forward pass for the hooks (any head: the outputs are not read)."""
    call(model, inputs)


@torch.inference_mode()
def activation_matching(
    a: nn.Module,
    b: nn.Module,
    spec: PermutationSpec | None,
    data: Any,
    *,
    batch_size: int = 64,
    collate_fn: Any = None,
    evaluator: Evaluator | None = None,
) -> MatchingResult:
    """The permutation of ``b``'s hidden units whose activations best correlate with ``a``'s on
    ``data`` (a dataset of feature dicts or ``EvalData``; labels are not needed).

    Activations are read with forward hooks from the modules the spec names (the residual
    stream after the embeddings and after every layer, queries, keys, values, the FFN and
    pooler pre-activations), one row per non-padding token. Correlations come from sums built
    with matrix products on the device and reduced over the evaluator's processes; each group's
    assignment problem then maximises the summed correlations. ``batch_size`` bounds memory:
    one batch of ``a``'s activations is held while ``b`` runs.
    """
    started = time.perf_counter()
    check_same_architecture(a, b)
    spec = spec or permutation_spec(a)
    spec.check_model(a, "first model")
    spec.check_model(b, "second model")
    if not isinstance(data, EvalData):
        data = EvalData(data, batch_size=batch_size, collate_fn=collate_fn, labelled=False, name="alignment data")
    evaluator = evaluator or Evaluator()
    evaluator.ready(a, b)

    readers: dict[str, list[tuple[Slot, ActivationRef, _Moments]]] = {}
    if not any(slot.activations for slot in spec.slots.values()):
        raise UnsupportedArchitectureError(
            f"The {spec.architecture} spec names no activations: align this architecture with weight matching.")
    for slot in spec.slots.values():
        for ref in slot.activations:  # a slot without any (output columns) is solved with its group
            readers.setdefault(ref.module, []).append((slot, ref, _Moments(slot.size, evaluator.device)))
    modules_a, modules_b = dict(a.named_modules()), dict(b.named_modules())
    missing = [name for name in readers if name not in modules_a or name not in modules_b]
    if missing:
        raise UnsupportedArchitectureError(f"Activation matching reads module {missing[0]!r}, which the model lacks.")

    held: dict[str, list[Any]] = {}  # per module, a's outputs in call order (shared layers run more than once)
    mask: list[torch.Tensor | None] = [None]

    def keep(name: str):
        def hook(_module, _inputs, output):
            held.setdefault(name, []).append(output)
        return hook

    def consume(name: str):
        def hook(_module, _inputs, output):
            out_a = held[name].pop(0)
            for slot, ref, moments in readers[name]:
                moments.add(_rows(out_a, ref, slot.size, mask[0]), _rows(output, ref, slot.size, mask[0]))
        return hook

    handles = [modules_a[n].register_forward_hook(keep(n)) for n in readers]
    handles += [modules_b[n].register_forward_hook(consume(n)) for n in readers]
    try:
        for _, inputs, _ in evaluator.batches(data, desc="activation matching"):
            attention = inputs.get("attention_mask")
            mask[0] = attention.bool() if attention is not None else None
            with evaluator.autocast():
                _run(a, inputs)
                _run(b, inputs)
    finally:
        for handle in handles:
            handle.remove()
        held.clear()

    correlations: dict[str, torch.Tensor] = {}
    for entries in readers.values():
        for slot, _, moments in entries:
            if evaluator.num_processes > 1:
                for tensor in moments.tensors():
                    tensor.copy_(evaluator.accelerator.reduce(tensor, reduction="sum"))
            corr = moments.correlation()
            correlations[slot.name] = correlations[slot.name] + corr if slot.name in correlations else corr
    perm, value = {}, 0.0
    unread = [g for g in spec.groups if not any(slot.name in correlations for slot in g.slots)]
    for group in spec.groups:
        if group in unread:
            continue
        costs = {slot.name: correlations[slot.name].cpu().numpy() if slot.name in correlations
                 else np.zeros((slot.size, slot.size)) for slot in group.slots}
        proposal = solve_group(group, costs)
        value += assignment_value(costs, proposal)
        perm.update(proposal)
    if unread:  # no module output carries them (the attention inside nn.MultiheadAttention)
        perm.update(_from_weights(a, b, spec, perm, unread))
    return MatchingResult(perm, "activation", time.perf_counter() - started, None, True, value)
