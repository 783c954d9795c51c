"""The training stage: a butterfly study inside the Trainer's own loop.

- ``StabilityMixin`` (trainer.py): ``butterfly()`` for any Trainer subclass, as hook overrides;
  ``StabilityTrainer`` is the mixin on ``transformers.Trainer``.
- ``ButterflyStudy`` (study.py): the study, top to bottom: plan, parent, children, finalise.
- ``StabilityArguments`` (arguments.py), ``ButterflyResult`` (result.py).
- ``PerturbationCallback`` (callbacks.py, with every other callback): perturb any Trainer run.
- stacked.py: K children trained as one stacked model (``parallel_children``).
- preflight.py, identity.py, checkpoints.py, analysis_data.py, divergence.py, determinism.py:
  the checks before training, the run's identity, reading checkpoints back, the data saved for
  the analyzer, the online divergence measure, deterministic kernels.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {
    "ButterflyResult": ".result",
    "PerturbationCallback": ".callbacks",
    "StabilityArguments": ".arguments",
    "StabilityMixin": ".trainer",
    "StabilityTrainer": ".trainer",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .arguments import StabilityArguments  # noqa: F401
    from .callbacks import PerturbationCallback  # noqa: F401
    from .result import ButterflyResult  # noqa: F401
    from .trainer import StabilityMixin, StabilityTrainer  # noqa: F401
