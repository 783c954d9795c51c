"""hf_stability: butterfly-effect stability studies for Hugging Face fine-tuning.

Perturb a training run at step t, train children beside an unperturbed control, and measure
how far they end from the parent (arXiv 2506.13234). The public API, imported on first use:

- training: ``StabilityTrainer``, ``StabilityMixin``, ``StabilityArguments``, ``PerturbationCallback``,
  ``ButterflyResult``
- perturbations: ``PerturbationConfig``, ``PerturbationRecord``, ``perturb_model``
- the run directory: ``RunDirectory``
- analysis and report: ``hf_stability.analysis`` (``analyze_run``...), ``hf_stability.report``
- errors: every exception of ``hf_stability.errors`` (``HfStabilityError`` is their base)
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

_ERRORS = (
    "AnalysisArgumentsError", "AnalysisDataError", "ArchitectureMismatchError", "ArgumentsError", "ChildDivergedError",
    "DiskFullError", "HfStabilityError", "MissingDataError", "NoMatchingParametersError", "PerturbationConfigError",
    "PushError", "ReportError", "RunConfigMismatchError", "RunDirectoryError", "RunInUseError", "SpawnStepError",
    "StudyArgumentsError", "StudySetupError", "UnknownInitScaleError", "UnsupportedArchitectureError",
)
_EXPORTS = {
    "ButterflyResult": ".training",
    "PerturbationCallback": ".training",
    "StabilityArguments": ".training",
    "StabilityMixin": ".training",
    "StabilityTrainer": ".training",
    "PerturbationConfig": ".perturb",
    "PerturbationRecord": ".perturb",
    "perturb_model": ".perturb",
    "RunDirectory": ".run_directory",
    **{name: ".errors" for name in _ERRORS},
}
__all__ = sorted(_EXPORTS) + ["__version__"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs: the names as they resolve
    from .errors import *  # noqa: F403
    from .perturb import PerturbationConfig, PerturbationRecord, perturb_model  # noqa: F401
    from .run_directory import RunDirectory  # noqa: F401
    from .training import ButterflyResult, PerturbationCallback, StabilityArguments, StabilityMixin, StabilityTrainer  # noqa: F401
