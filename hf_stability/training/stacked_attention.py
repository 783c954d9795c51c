"""Attention of stacked children: each child's scaled-dot-product attention computed as that child
alone computes it, dropout mask included.

Under ``vmap`` torch would run one attention kernel over the K children's batches at once. A fused
kernel draws its dropout mask from each example's place in that K-times larger batch, so every
child would see other masks than a model alone (and on CUDA its backward fails for timm's layout).
``PerChildAttention``, a TorchFunctionMode that ``StackedModel`` enters around its vmap, calls
``F.scaled_dot_product_attention`` once per child instead, on that child's slice and from the same
RNG state (set again before each child), so that each child draws the mask one model draws from
that state; the generator is left where one call leaves it. The backward is each call's own
(the fused kernel's backward, which replays its mask): the gradient of each child alone.

Stacked runs made before this used eager attention for every model of the run on CUDA, whose
float32 probabilities, dropout masks and casts were most of a stacked step's memory traffic; such
a run keeps eager attention when it resumes (``RunSettings.eager_attention``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

PER_CHILD = "per_child"  # stability_config.json's "stacked_attention" for runs made with this module
SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
KERNEL_ATTENTION = (None, "eager", "sdpa")  # attention implementations that stacked children can run


class PerChildAttention(TorchFunctionMode):
    """Inside a ``vmap`` over children: every ``F.scaled_dot_product_attention`` runs child by
    child, each from the same RNG state (see module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        bound = {**dict(zip(SDPA_ARGUMENTS, args)), **kwargs}
        query, key, value = bound.pop("query"), bound.pop("key"), bound.pop("value")
        attn_mask = bound.pop("attn_mask", None)
        return _ChildrenSDPA.apply(query, key, value, attn_mask, tuple(sorted(bound.items())))


def attention_for_stacked_run(model: nn.Module, eager: bool, device: torch.device) -> None:
    """The attention of every model in a run made for stacked children: eager on CUDA for a run
    made before per-child attention (``eager``), else SDPA where the model's attention is neither
    eager nor SDPA (flash-attention-2, flex...): stacked children run SDPA child by child, and their
    parent must compute the same attention. timm models call SDPA already."""
    if eager:
        if device.type == "cuda":
            use_eager_attention(model)
        return
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) in KERNEL_ATTENTION:
        return
    logger.info("Using SDPA attention instead of %s: stacked children need it, and so does their parent.",
                config._attn_implementation)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")
    else:
        config._attn_implementation = "sdpa"


def use_eager_attention(model: nn.Module) -> None:
    """Switch ``model`` to eager attention, in transformers' modules and in timm's (``fused_attn``):
    what every model of a stacked run made before per-child attention used on CUDA.

    Then vmap ran one fused attention kernel for all children, whose dropout masks are not those
    of a model alone and whose backward failed for timm's layout (H100, torch 2.11: "LSE is not
    correctly aligned (strideH)"); such a run's parent trained with eager attention, and its
    children must too: with another attention the masks and the rounding differ, and the control
    would not follow its parent (measured on an H100: L2 1.8 instead of 1e-4 after 200 steps).
    """
    for module in model.modules():
        if getattr(module, "fused_attn", False) is True:
            module.fused_attn = False
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in (None, "eager"):
        logger.info("Using eager attention: stacked children on CUDA need it, and so does their parent.")
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:
            config._attn_implementation = "eager"


@dataclass
class CapturedDraws:
    """Per-child attention inside a CUDA graph capture (stacked_graphs.py).

    Outside a capture each child's SDPA call starts from the saved RNG state; inside one, torch
    refuses to read or set the state. There child 0 of each attention call draws from the default
    generator as always, and child k > 0 of call c from a generator of its own, registered with the
    graph, whose offset ``set_for_replay`` sets before each replay to the default generator's offset
    at call c: a step draws the same amounts in the same order every time, so those offsets
    (relative to the step's start) are read once, in an eager warm-up step (``begin_step``)."""

    offsets: list[int] = field(default_factory=list)  # per attention call: the default offset, from the step start
    generators: list[list[torch.Generator]] = field(default_factory=list)  # per call: children 1..K-1
    device: torch.device | None = None
    start: int = 0
    capturing: bool = False
    calls: int = 0  # attention calls captured so far

    def begin_step(self, device: torch.device) -> None:
        """An eager warm-up step starts: record its attention calls' offsets afresh."""
        self.device, self.offsets = device, []
        self.start = default_generator(device).get_offset()

    def make_generators(self, children: int, graph: torch.cuda.CUDAGraph) -> None:
        """One generator per recorded call and child after the first, registered with ``graph``
        (before its capture begins)."""
        self.generators = [[torch.Generator(device=self.device) for _ in range(children - 1)] for _ in self.offsets]
        for generators in self.generators:
            for generator in generators:
                graph.register_generator_state(generator)

    def set_for_replay(self) -> None:
        """Before a replay: each call's generators start where the default generator will be at
        that call."""
        default = default_generator(self.device)
        seed, offset = default.initial_seed(), default.get_offset()
        for relative, generators in zip(self.offsets, self.generators):
            for generator in generators:
                generator.manual_seed(seed)
                generator.set_offset(offset + relative)


_DRAWS: ContextVar[CapturedDraws | None] = ContextVar("hf_stability_captured_draws", default=None)


@contextmanager
def captured_draws(draws: CapturedDraws, capturing: bool) -> Iterator[None]:
    """Per-child attention records its calls' offsets (an eager warm-up step) or draws from
    ``draws``' generators (``capturing``) inside this context."""
    draws.capturing, draws.calls = capturing, 0
    token = _DRAWS.set(draws)
    try:
        yield
    finally:
        _DRAWS.reset(token)
        draws.capturing = False


def default_generator(device: torch.device) -> torch.Generator:
    """The default CUDA generator of ``device`` (the current device where it has no index)."""
    return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class _ChildrenSDPA(torch.autograd.Function):
    """SDPA called by ``PerChildAttention`` inside the vmap: its vmap rule hands the stacked
    tensors (children on dim 0) to ``_PerChildSDPA``."""

    @staticmethod
    def forward(query, key, value, attn_mask, options):
        raise RuntimeError("PerChildAttention computes attention only inside a vmap over stacked children.")

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_output):
        raise RuntimeError("unreachable: the vmap rule's _PerChildSDPA records the backward")

    @staticmethod
    def vmap(info, in_dims, query, key, value, attn_mask, options):
        def children_first(x: torch.Tensor, dim: int | None) -> torch.Tensor:
            return x.expand(info.batch_size, *x.shape) if dim is None else x.movedim(dim, 0)

        query, key, value = (children_first(x, d) for x, d in zip((query, key, value), in_dims[:3]))
        per_child = attn_mask is not None and in_dims[3] is not None
        if per_child:
            attn_mask = attn_mask.movedim(in_dims[3], 0)
        return _PerChildSDPA.apply(query, key, value, attn_mask, options, per_child), 0


class _PerChildSDPA(torch.autograd.Function):
    """SDPA of K children stacked on dim 0, one child at a time from one RNG state. The forward
    keeps the children's own autograd graph (each SDPA call's backward, which replays its own
    dropout mask), and the backward runs it once for all children."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, options, mask_per_child):
        children = query.shape[0]

        def leaf(t: torch.Tensor | None, i: int | None) -> torch.Tensor | None:
            # each child's own leaf (not a slice of one stacked leaf, whose backward fills K-1 zeros)
            return None if t is None else (t if i is None else t[i]).detach().requires_grad_(t.requires_grad)

        leaves = [[leaf(t, i) for i in range(children)] for t in (query, key, value)]
        masks = [leaf(attn_mask, i) for i in range(children)] if mask_per_child else [leaf(attn_mask, None)]

        def attention(i: int) -> torch.Tensor:
            return F.scaled_dot_product_attention(leaves[0][i], leaves[1][i], leaves[2][i],
                                                  attn_mask=masks[i if mask_per_child else 0], **dict(options))

        outputs = []
        draws = _DRAWS.get()
        with torch.enable_grad():
            if draws is not None and draws.capturing:  # each child k > 0 from its generator (CapturedDraws)
                default = default_generator(query.device)
                main, generators = default.graphsafe_get_state(), draws.generators[draws.calls]
                draws.calls += 1
                try:
                    for i in range(children):
                        if i:
                            default.graphsafe_set_state(generators[i - 1])
                        outputs.append(attention(i))
                finally:
                    default.graphsafe_set_state(main)
            else:
                if draws is not None:
                    draws.offsets.append(default_generator(query.device).get_offset() - draws.start)
                state = _rng_state(query.device)
                for i in range(children):
                    _set_rng_state(query.device, state)  # each child draws the mask one model draws
                    outputs.append(attention(i))
        ctx.graph, ctx.mask_per_child = (leaves + [masks], outputs), mask_per_child
        return torch.stack([out.detach() for out in outputs])

    @staticmethod
    def backward(ctx, grad_output):
        groups, outputs = ctx.graph  # the children's leaves of query, key, value and mask
        ctx.graph = None
        wanted = [j for j, group in enumerate(groups) if group[0] is not None and group[0].requires_grad]
        grads: list[torch.Tensor | None] = [None] * 4
        if wanted:
            flat = torch.autograd.grad(outputs, [leaf for j in wanted for leaf in groups[j]], list(grad_output))
            start = 0
            for j in wanted:
                part = flat[start:start + len(groups[j])]
                start += len(groups[j])
                grads[j] = torch.stack(part) if j < 3 or ctx.mask_per_child else part[0]  # a shared mask: one leaf
        return (*grads, None, None)
