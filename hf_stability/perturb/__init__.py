"""Seeded perturbations of a model's weights or randomness at a chosen training step.

Pure torch, no Trainer: ``perturb_model(model, PerturbationConfig(...), step=t, child=k)``.
"""

from .apply import PerturbationRecord, TensorChange, perturb_model
from .config import (
    KINDS,
    REFERENCE_KINDS,
    RNG_KINDS,
    SCALE_MODES,
    WEIGHT_KINDS,
    PerturbationConfig,
    PerturbationKind,
    ScaleMode,
)
from .rng import derive_seed, make_generator, preserve_global_rng
from .scales import init_scales
from .selection import select_parameters

__all__ = [
    "KINDS",
    "REFERENCE_KINDS",
    "RNG_KINDS",
    "SCALE_MODES",
    "ScaleMode",
    "WEIGHT_KINDS",
    "PerturbationConfig",
    "PerturbationKind",
    "PerturbationRecord",
    "TensorChange",
    "derive_seed",
    "init_scales",
    "make_generator",
    "perturb_model",
    "preserve_global_rng",
    "select_parameters",
]
