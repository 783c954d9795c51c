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


class DiskFullError(HfStabilityError, OSError):
    """A write failed because the disk (or the process's file-size or quota limit) is full."""


#: What libraries say when a write hits a full disk: errno numbers, and the messages of torch.save
#: (a RuntimeError from its stream writer) and safetensors (a SafetensorError), which keep no OSError.
_DISK_FULL_ERRNOS = (28, 27, 122)  # ENOSPC, EFBIG, EDQUOT
_DISK_FULL_WORDS = ("no space left on device", "file too large", "disk quota exceeded", "file write failed",
                    "os error 28", "os error 27", "os error 122", "iostream error", "unexpected pos")


def disk_full_error(error: BaseException, target: object) -> DiskFullError | None:
    """A DiskFullError saying what to do when writing ``target`` failed on a full disk; None when
    ``error`` is something else."""
    reason = disk_full_reason(error)
    if reason is None:
        return None
    return DiskFullError(
        f"Writing {target} failed: the disk is full or failing ({reason}). Free space (or choose another "
        "output_dir) and run the same command again: nothing half-written is taken as complete, and a study "
        "resumes from its last complete checkpoint."
    )


def disk_full_reason(error: BaseException) -> str | None:
    """The message of the full-disk failure in ``error``'s chain of causes, or None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return error.strerror or str(error)
        if any(word in str(error).lower() for word in _DISK_FULL_WORDS):
            return str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        error = error.__cause__ or error.__context__
    return None


class PushError(HfStabilityError):
    """Uploading a report to the Hub failed (invalid repo id, no token, the Hub refused)."""
