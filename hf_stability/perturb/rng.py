"""Random number generators of perturbations: their own, never the global ones."""

from __future__ import annotations

import pickle
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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


def global_rng_state() -> dict[str, Any]:
    """Python's, numpy's, torch's CPU and every CUDA device's global RNG state (what set_seed seeds)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_state_key(state: dict[str, Any]) -> bytes:
    """Bytes that are equal exactly when two :func:`global_rng_state` results are (a dict key;
    pickled tensors are not byte-stable, their numpy copies are)."""
    return pickle.dumps((state["python"], state["numpy"], state["cpu"].numpy(),
                         [s.numpy() for s in state.get("cuda", [])]))


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Put every global RNG back to ``state`` (from :func:`global_rng_state`)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def preserve_global_rng() -> Iterator[None]:
    """Restore python, numpy, torch CPU and CUDA global RNG states on exit.

    Perturbing must not move any global RNG: a child and its control child must see the same
    dropout masks and data order after the spawn step.
    """
    state = global_rng_state()
    try:
        yield
    finally:
        set_global_rng_state(state)
