"""hf_stability: butterfly-effect stability studies for Hugging Face fine-tuning.

Perturb a training run at step t, train children beside an unperturbed control, and measure
how far they end from the parent (arXiv 2506.13234).
"""

__version__ = "0.1.0"

from .arguments import StabilityArguments
from .callback import PerturbationCallback
from .errors import (
    AnalysisDataError,
    ArchitectureMismatchError,
    ChildDivergedError,
    HfStabilityError,
    MissingDataError,
    NoMatchingParametersError,
    PerturbationConfigError,
    PushError,
    ReportError,
    RunConfigMismatchError,
    RunDirectoryError,
    SpawnStepError,
    UnknownInitScaleError,
    UnsupportedArchitectureError,
)
from .perturb import PerturbationConfig, PerturbationRecord, perturb_model
from .run_directory import RunDirectory
from .trainer import ButterflyResult, StabilityTrainer

__all__ = [
    "AnalysisDataError",
    "ArchitectureMismatchError",
    "ButterflyResult",
    "ChildDivergedError",
    "HfStabilityError",
    "MissingDataError",
    "NoMatchingParametersError",
    "PerturbationCallback",
    "PerturbationConfig",
    "PerturbationConfigError",
    "PerturbationRecord",
    "PushError",
    "ReportError",
    "RunConfigMismatchError",
    "RunDirectory",
    "RunDirectoryError",
    "SpawnStepError",
    "StabilityArguments",
    "StabilityTrainer",
    "UnknownInitScaleError",
    "UnsupportedArchitectureError",
    "__version__",
    "perturb_model",
]
