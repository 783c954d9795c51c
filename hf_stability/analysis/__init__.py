"""Measures of how far two models are apart. Reads models, never trains, does no file I/O
(the runner in ``runner.py`` does that).

- ``l2_distance(a, b, per_layer=True)``: raw, relative, per tensor and per layer L2.
- ``interpolate(a, b, alpha)`` / ``Interpolator``: weights along the linear path.
- ``barrier(a, b, data, metric="loss" | "error" | evaluate metric, alphas=11)``.
- ``linear_cka(X, Y)``, ``layerwise_cka(a, b, data, pooling="cls" | "mean" | "all")``.
- ``disagreement(a, b, data)``.

Evaluation is batched under ``torch.inference_mode`` (optionally under bf16/fp16 autocast)
and sharded over the processes of an ``accelerate launch`` through ``Evaluator``.
"""

from .barrier import BarrierResult, barrier, barrier_from_values, barriers
from .compare import check_same_architecture, layer_of
from .distance import L2Result, l2_distance
from .evaluation import EvalData, EvalSums, Evaluator
from .interpolation import Interpolator, default_alphas, interpolate
from .representations import RepresentationResult, compare_representations, disagreement, layerwise_cka, linear_cka
from .runner import AnalyzeArguments, analyze_run

__all__ = [
    "AnalyzeArguments",
    "BarrierResult",
    "EvalData",
    "EvalSums",
    "Evaluator",
    "Interpolator",
    "L2Result",
    "RepresentationResult",
    "analyze_run",
    "barrier",
    "barrier_from_values",
    "barriers",
    "check_same_architecture",
    "compare_representations",
    "default_alphas",
    "disagreement",
    "interpolate",
    "l2_distance",
    "layer_of",
    "layerwise_cka",
    "linear_cka",
]
