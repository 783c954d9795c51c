"""The exceptions hf_stability raises for problems a user can fix.

Every message says what was expected, what was found and what to do. Catch
``HfStabilityError`` to handle all of them.
"""

from __future__ import annotations


class HfStabilityError(Exception):
    """Base class of every error hf_stability raises on purpose."""


class PerturbationConfigError(HfStabilityError, ValueError):
    """A perturbation setting is invalid (unknown kind, negative or NaN scale, bad pattern...)."""


class NoMatchingParametersError(HfStabilityError, ValueError):
    """include/exclude patterns selected no parameter of the model."""


class UnknownInitScaleError(HfStabilityError, ValueError):
    """scale_mode='init' was asked for a tensor whose initialiser std is not known."""


class SpawnStepError(HfStabilityError, ValueError):
    """A spawn step lies outside the training run."""


class RunDirectoryError(HfStabilityError):
    """A run directory is missing, incomplete or belongs to another configuration."""


class RunConfigMismatchError(RunDirectoryError):
    """The output directory holds a run made with other settings."""


class MissingDataError(HfStabilityError, FileNotFoundError):
    """An offline data or model package is not installed."""


class ChildDivergedError(HfStabilityError, FloatingPointError):
    """A child's loss or weights became NaN or Inf; the child is marked diverged."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"child diverged at step {step}: {reason}")
        self.step = step
        self.reason = reason


class ArchitectureMismatchError(HfStabilityError, ValueError):
    """Two models that should be compared have different tensors or shapes."""


class AnalysisDataError(HfStabilityError, ValueError):
    """The data given to the analyzer cannot be evaluated (empty, no labels...)."""


class UnsupportedArchitectureError(HfStabilityError, ValueError):
    """Permutation alignment has no spec for this architecture (or this variant of it)."""


class ReportError(HfStabilityError, ValueError):
    """A run has no analysis, or its report.json is of another schema or incomplete."""


class PushError(HfStabilityError):
    """Uploading a report to the Hub failed (invalid repo id, no token, the Hub refused)."""
