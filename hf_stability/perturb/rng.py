"""Random number generators of perturbations: their own, never the global ones."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def derive_seed(seed: int, step: int, child: int, stream: int = 0) -> int:
    """A 63-bit seed that depends on (seed, step, child, stream) only.

    numpy's SeedSequence mixes the four integers without touching numpy's global state, so
    child 3 at step 100 always gets the same noise, on any machine and any rank.
    """
    words = [int(seed) & 0xFFFFFFFF, int(step), int(child), int(stream)]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def make_generator(seed: int, step: int, child: int, stream: int = 0) -> torch.Generator:
    """A CPU torch.Generator seeded by :func:`derive_seed`. Noise is drawn on the CPU so that
    every device and every rank draws the same numbers."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(derive_seed(seed, step, child, stream))
    return generator


@contextmanager
def preserve_global_rng() -> Iterator[None]:
    """Restore python, numpy, torch CPU and CUDA global RNG states on exit.

    Perturbing must not move any global RNG: a child and its control child must see the same
    dropout masks and data order after the spawn step.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda_devices, enabled=True):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
