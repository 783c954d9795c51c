"""A stacked step captured once and replayed: CUDA graphs of ``StackedModel``'s forward and backward.

Why: a step of stacked small children is bound by the host, not the GPU. vmap sends every operation
through its batching rules and per-child attention calls SDPA once per child and layer, so the GPU
waits for Python (docs/performance.md: 85.7 ms of CPU time against 30.7 ms of device time for 8
MiniLM-shaped children in bf16). A graph replays the kernels the eager step launched, on the same
memory, so the Trainer's loop, the optimizer, clipping and callbacks stay eager and unchanged.

What a replay computes is what the eager step computes:
- the same dropout masks: each replay starts from the generator's offset at that moment and
  advances it by what the eager step draws (torch's graph-safe RNG); per-child attention, whose
  children each start from one RNG state, draws them from generators registered with the graph
  (stacked_attention.py's ``CapturedDraws``: torch cannot read or set an RNG state while capturing);
- the same attention path: the batch is passed as the eager step gets it, ``attention_mask``
  included, so a batch with padding and one without share a graph (a first version dropped an
  all-ones mask, as a model alone may: its replays took another kernel, with other dropout draws);
- the same weights: the autocast cache is off while capturing, so every weight is cast inside the
  graph at each replay, not once.

A graph pair is kept per input signature (shapes and dtypes), captured the second time a
signature comes (so a last, shorter batch runs eagerly), at most ``MAX_SIGNATURES`` of them, and
only where the device has the memory the graphs keep (``StepGraphs._should_capture``); anything
else runs eagerly. Capturing warms up on the capture stream first; the RNG state and the model's
buffers (batch-norm statistics) are put back after it. A model that cannot be captured (it waits
for the GPU inside its forward, for one) runs eagerly from then on, with a warning. Graphs only
run on CUDA, in training, with gradients enabled. tests/test_stacked_graphs.py (GPU only) holds
these.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..perturb.rng import global_rng_state, set_global_rng_state
from .stacked_attention import CapturedDraws, captured_draws, default_generator

logger = logging.getLogger(__name__)

MAX_SIGNATURES = 3  # graph pairs kept per stacked model (each holds one step's activations)
CAPTURE_ON_SIGHTING = 2  # a signature is captured the second time it comes
WARMUP_STEPS = 2  # eager forward/backward passes on the capture stream before capturing


@dataclass
class _Captured:
    """One signature's graphs and the static tensors they read and write."""

    inputs: dict[str, torch.Tensor]
    names: list[str]  # the trainable stacked parameters, in the order of ``grads``
    forward_graph: torch.cuda.CUDAGraph
    backward_graph: torch.cuda.CUDAGraph
    loss: torch.Tensor
    logits: torch.Tensor
    losses: torch.Tensor
    grad_loss: torch.Tensor
    grads: list[torch.Tensor | None]
    draws: CapturedDraws  # the generators per-child attention draws from in the forward graph
    generation: int = 0  # forward replays so far: a backward must follow its own forward


@dataclass
class StepGraphs:
    """The CUDA graphs of one stacked model's training step, by input signature. It holds no
    reference to the model (which holds it), so that a finished group's memory goes with it."""

    captured: dict[tuple, _Captured] = field(default_factory=dict)
    sightings: dict[tuple, int] = field(default_factory=dict)
    disabled: str | None = None  # why this model runs eagerly from now on
    step_bytes: dict[tuple, int] = field(default_factory=dict)  # what an eager forward held, by signature
    too_large: set[tuple] = field(default_factory=set)  # signatures whose graphs would not fit in free memory

    def __call__(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step of ``model`` (a StackedModel) as ``(loss, logits, per-child losses)``: replayed
        from graphs where a signature was captured, eager otherwise."""
        key = _signature(inputs) if self.disabled is None else None
        entry = self.captured.get(key) if key is not None else None
        if entry is None and key is not None and self._should_capture(model, key):
            entry = self._capture(model, key, inputs)
        if entry is None:
            before = torch.cuda.memory_allocated()
            loss, logits, losses = model.children_forward(inputs)
            if key is not None:
                self.step_bytes[key] = torch.cuda.memory_allocated() - before
            return loss, logits, losses
        for name, static in entry.inputs.items():
            static.copy_(inputs[name], non_blocking=True)
        stacked = model.stacked_parameters()
        loss = _Replay.apply(entry, *(stacked[n] for n in entry.names))
        return loss, entry.logits.clone(), entry.losses.clone()

    def _should_capture(self, model: nn.Module, key: tuple) -> bool:
        """A signature is captured on its second sighting, while fewer than ``MAX_SIGNATURES`` are,
        and where the device has the memory its graphs keep for good (one step's activations,
        beside what the eager steps cached, and the gradients) and the warm-up takes (as much)."""
        self.sightings[key] = self.sightings.get(key, 0) + 1
        if self.sightings[key] < CAPTURE_ON_SIGHTING or len(self.captured) >= MAX_SIGNATURES or key in self.too_large:
            return False
        grads = sum(p.numel() * p.element_size() for p in model.stacked_parameters().values() if p.requires_grad)
        need = int(1.25 * (2 * self.step_bytes.get(key, 0) + grads))
        free = torch.cuda.mem_get_info()[0]
        if need > free:
            self.too_large.add(key)
            logger.info("A stacked step runs eagerly for inputs %s: its CUDA graphs would need about %.1f GiB and "
                        "%.1f GiB are free.", [part[:2] for part in key[2:] if isinstance(part, tuple)],
                        need / 2**30, free / 2**30)
            return False
        return True

    def _capture(self, model: nn.Module, key: tuple, inputs: dict[str, Any]) -> _Captured | None:
        # The graphs read the parameters through detached aliases (the same memory, which the
        # optimizer updates in place): fresh autograd leaves, whatever graph of an earlier step
        # the caller still holds (its gradient nodes belong to another stream).
        aliases = {n: p.detach().requires_grad_(p.requires_grad) for n, p in model.stacked_parameters().items()}
        names = [n for n, p in aliases.items() if p.requires_grad]
        params = [aliases[n] for n in names]
        static = {n: v.detach().clone() if isinstance(v, torch.Tensor) else v for n, v in inputs.items()}
        rng, buffers = global_rng_state(), [b.detach().clone() for b in model.buffers()]
        device = params[0].device if params else torch.device("cuda", torch.cuda.current_device())

        def restore(failed: bool = False) -> None:  # what the warm-up passes (or a failed capture) changed
            if failed:  # a failed capture leaves the CUDA generator's state marked as capturing: a fresh one
                fresh = torch.Generator(device=device)
                fresh.set_state(torch.cuda.get_rng_state(device))
                default_generator(device).graphsafe_set_state(fresh)
            set_global_rng_state(rng)
            with torch.no_grad():
                for buffer, saved in zip(model.buffers(), buffers):
                    buffer.copy_(saved)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with _no_autocast_cache():
                draws = CapturedDraws()
                with torch.cuda.stream(stream):
                    for _ in range(WARMUP_STEPS):
                        draws.begin_step(device)  # the last warm-up's attention offsets are kept
                        with captured_draws(draws, capturing=False):
                            loss, _, _ = model.children_forward(static, aliases)
                        torch.autograd.grad(loss, params, allow_unused=True)
                torch.cuda.current_stream().wait_stream(stream)
                restore()
                pool = torch.cuda.graph_pool_handle()
                forward_graph, backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
                draws.make_generators(model.num_children, forward_graph)
                with torch.cuda.graph(forward_graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                    with captured_draws(draws, capturing=True):
                        loss, logits, losses = model.children_forward(static, aliases)
                grad_loss = torch.empty_like(loss)
                with torch.cuda.graph(backward_graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                    grads = list(torch.autograd.grad(loss, params, grad_outputs=grad_loss, allow_unused=True))
        except Exception as err:  # noqa: BLE001 - whatever fails under capture, the eager step still runs
            first = err.__context__ or err  # ending a failed capture raises again: the first error says why
            self.disabled = f"{type(first).__name__}: {(str(first).splitlines() or [''])[0][:300]}"
            logger.warning("Stacked children train without CUDA graphs (each step launched from Python, slower): "
                           "their step could not be captured (%s). Nothing else changes; stacked_cuda_graphs=False "
                           "skips the attempt.", self.disabled)
            self.captured.clear()
            torch.cuda.synchronize()
            restore(failed=True)
            return None
        tensors = {n: v for n, v in static.items() if isinstance(v, torch.Tensor)}
        entry = _Captured(tensors, names, forward_graph, backward_graph, loss.detach(), logits.detach(),
                          losses.detach(), grad_loss, grads, draws)
        self.captured[key] = entry
        logger.info("Captured the stacked children's step as CUDA graphs for inputs %s.",
                    {n: tuple(t.shape) for n, t in tensors.items()})
        return entry


class _Replay(torch.autograd.Function):
    """The captured forward as an autograd node whose backward replays the captured backward."""

    @staticmethod
    def forward(ctx, entry: _Captured, *params: torch.Tensor) -> torch.Tensor:
        entry.draws.set_for_replay()
        entry.forward_graph.replay()
        entry.generation += 1
        ctx.entry, ctx.generation = entry, entry.generation
        return entry.loss.clone()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        entry = ctx.entry
        if entry.generation != ctx.generation:
            raise RuntimeError("A stacked step replayed as a CUDA graph was run forward again before its backward: "
                               "its activations are gone. Call backward() after each forward, or set "
                               "stacked_cuda_graphs=False.")
        entry.grad_loss.copy_(grad_loss)
        entry.backward_graph.replay()
        return (None, *entry.grads)


def _signature(inputs: dict[str, Any]) -> tuple | None:
    """What a graph is valid for: the autocast state, each tensor's shape, dtype and device, every
    other value itself; None where a value cannot be part of a key (a tensor off the GPU, an
    unhashable value)."""
    parts: list[Any] = [torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")]
    for name in sorted(inputs):
        value = inputs[name]
        if isinstance(value, torch.Tensor):
            if value.device.type != "cuda":
                return None
            parts.append((name, tuple(value.shape), value.dtype, value.device))
        else:
            try:
                hash(value)
            except TypeError:
                return None
            parts.append((name, value))
    return tuple(parts)


@contextmanager
def _no_autocast_cache() -> Iterator[None]:
    """Autocast as it is, without its cache of cast weights: a cast cached outside the graph
    would be replayed stale (the weights change at every step)."""
    previous = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(previous)
