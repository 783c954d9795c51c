"""The exceptions hf_stability raises for problems a user can fix (declarations only).

Every message says what was expected, what was found and what to do. Catch
``HfStabilityError`` to handle all of them; each is also the builtin exception it resembles
(``ValueError`` for bad arguments, ``OSError`` for a full disk...), and carries as fields what a
caller needs to act on it.

    HfStabilityError
    ├── ArgumentsError (ValueError)             an option or argument is invalid
    │   ├── StudyArgumentsError                 StabilityArguments, a study's model/data/recipe options
    │   ├── PerturbationConfigError             a PerturbationConfig setting
    │   ├── SpawnStepError                      a spawn step outside the run
    │   └── AnalysisArgumentsError              AnalyzeArguments
    ├── StudySetupError (ValueError)            the Trainer, model or data cannot run a study as given
    ├── NoMatchingParametersError (ValueError)  include/exclude patterns select nothing (or too few entries)
    ├── UnknownInitScaleError (ValueError)      scale_mode='init' for a tensor of unknown init
    ├── RunDirectoryError                       a run directory is missing, damaged or of another format
    │   ├── RunConfigMismatchError              it holds a run of other settings (.differences)
    │   └── RunInUseError                       another process writes it (.pid)
    ├── ChildDivergedError (FloatingPointError) a child's loss or weights became NaN/Inf (.step, .reason)
    ├── ArchitectureMismatchError (ValueError)  two compared models differ in tensors or shapes
    ├── UnsupportedArchitectureError (ValueError) no permutation spec for a model
    ├── AnalysisDataError (ValueError)          data the analyzer cannot evaluate
    ├── ReportError (ValueError)                no analysis, or a report of another schema or damaged
    ├── PushError                               the upload to the Hub failed (.status)
    ├── MissingDataError (FileNotFoundError)    an offline package, dataset or model is not there
    └── DiskFullError (OSError)                 a write failed on a full disk (.path)
"""

from __future__ import annotations

from pathlib import Path


class HfStabilityError(Exception):
    """Base class of every error hf_stability raises on purpose."""


class ArgumentsError(HfStabilityError, ValueError):
    """An option or argument is invalid (the message names it and the values it may take)."""


class StudyArgumentsError(ArgumentsError):
    """A study option is invalid: StabilityArguments, a study's model or data arguments, a recipe
    config file."""


class PerturbationConfigError(ArgumentsError):
    """A perturbation setting is invalid (unknown kind, negative or NaN scale, bad pattern...)."""


class SpawnStepError(ArgumentsError):
    """A spawn step lies outside the training run."""


class AnalysisArgumentsError(ArgumentsError):
    """An option of the analysis (AnalyzeArguments) is invalid."""


class StudySetupError(HfStabilityError, ValueError):
    """The Trainer, its model or its data cannot run a butterfly study as given (checked before
    anything trains)."""


class NoMatchingParametersError(HfStabilityError, ValueError):
    """include/exclude patterns selected no parameter of the model (or fewer entries than asked)."""


class UnknownInitScaleError(HfStabilityError, ValueError):
    """scale_mode='init' was asked for a tensor whose initialiser std is not known."""


class RunDirectoryError(HfStabilityError):
    """A run directory is missing, incomplete, damaged or of another format (``path``: the file
    or folder at fault, when one is)."""

    def __init__(self, message: str, *, path: str | Path | None = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None


class RunConfigMismatchError(RunDirectoryError):
    """The output directory holds a run made with other settings (``differences``: one
    "key: old -> new" line per differing setting)."""

    def __init__(self, message: str, *, path: str | Path | None = None, differences: list[str] | None = None):
        super().__init__(message, path=path)
        self.differences = list(differences or [])


class RunInUseError(RunDirectoryError):
    """Another process holds the run directory's lock (``pid``: that process, when known)."""

    def __init__(self, message: str, *, path: str | Path | None = None, pid: int | None = None):
        super().__init__(message, path=path)
        self.pid = pid


class ChildDivergedError(HfStabilityError, FloatingPointError):
    """A child's loss or weights became NaN or Inf; the child is marked diverged."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"child diverged at step {step}: {reason}")
        self.step = step
        self.reason = reason


class ArchitectureMismatchError(HfStabilityError, ValueError):
    """Two models that should be compared have different tensors or shapes."""


class UnsupportedArchitectureError(HfStabilityError, ValueError):
    """Permutation alignment has no spec for this architecture (or this variant of it)."""


class AnalysisDataError(HfStabilityError, ValueError):
    """The data given to the analyzer cannot be evaluated (empty, no labels...)."""


class ReportError(HfStabilityError, ValueError):
    """A run has no analysis, or its report.json is of another schema, incomplete or damaged."""


class PushError(HfStabilityError):
    """Uploading a report to the Hub failed (invalid repo id, no token, a refused file, the Hub
    refused: ``status`` is its HTTP status when it answered)."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class MissingDataError(HfStabilityError, FileNotFoundError):
    """An offline data or model package is not installed, or a named dataset or model cannot be found."""


class DiskFullError(HfStabilityError, OSError):
    """A write failed because the disk (or the process's file-size or quota limit) is full
    (``path``: what was being written)."""

    def __init__(self, message: str, *, path: str | Path | None = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None
