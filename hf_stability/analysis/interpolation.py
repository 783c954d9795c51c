"""Linear interpolation of weights: theta(alpha) = (1 - alpha) theta_a + alpha theta_b."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .compare import check_same_architecture, floating_state


class Interpolator:
    """Writes theta(alpha) into one model buffer, in place, reading the endpoints' own tensors.

    Every floating tensor is interpolated, buffers included (BatchNorm statistics...); integer
    buffers are taken from ``a``. Moving along the path never reloads anything from disk, and
    the only memory it takes is the buffer: ``a`` and ``b`` must not change while it is used.
    ``dtype`` (bf16 for a bf16_full evaluation) casts the buffer's floating tensors: the path
    is still interpolated in fp32 and each point rounded once, so alpha 0 and 1 are exactly
    ``a.to(dtype)`` and ``b.to(dtype)``.
    """

    def __init__(self, a: nn.Module, b: nn.Module, dtype: torch.dtype | None = None):
        check_same_architecture(a, b, buffers=True)
        self.model = copy.deepcopy(a)
        if dtype is not None:
            self.model.to(dtype)  # (floating tensors only)
        self.model.eval()
        target = floating_state(self.model, buffers=True)
        source_a, source_b = floating_state(a, buffers=True), floating_state(b, buffers=True)
        self._targets = list(target.values())
        # the endpoints in their own dtype on the buffer's device (.to() is the tensor itself when the
        # device already matches: no copy); a cast buffer reads them in fp32
        own = dtype is None
        self._a = [source_a[n].detach().to(t.device, t.dtype if own else None) for n, t in target.items()]
        self._b = [source_b[n].detach().to(t.device, t.dtype if own else None) for n, t in target.items()]

    @torch.no_grad()
    def set_alpha(self, alpha: float) -> nn.Module:
        """Write theta(alpha) into ``self.model`` and return it."""
        alpha = float(alpha)
        for target, x, y in zip(self._targets, self._a, self._b):
            if alpha == 0.0:
                target.copy_(x)
            elif alpha == 1.0:
                target.copy_(y)
            elif x.dtype in (torch.float16, torch.bfloat16) or target.dtype != x.dtype:
                target.copy_(torch.lerp(x.float(), y.float(), alpha))  # interpolate in fp32, store rounded
            else:
                target.copy_(torch.lerp(x, y, alpha))
        return self.model


def interpolate(a: nn.Module, b: nn.Module, alpha: float) -> nn.Module:
    """A new model with weights (1 - alpha) a + alpha b (a's structure, eval mode)."""
    return Interpolator(a, b).set_alpha(alpha)


def default_alphas(n: int = 11) -> list[float]:
    """``n`` evenly spaced points in [0, 1]."""
    if n < 2:
        raise ValueError(f"Need at least 2 interpolation points, got {n}.")
    return [i / (n - 1) for i in range(n)]
