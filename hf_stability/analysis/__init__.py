"""Measures of how far two models are apart, and the analysis of a run directory. The measures
read models and do no file I/O; ``analyze_run`` reads a run directory and writes its report.

- ``analyze_run(run_dir, AnalyzeArguments(...))`` -> ``Report`` (schema.py), written as analysis/report.json.
- ``l2_distance(a, b, per_layer=True)``: raw, relative, per tensor and per layer L2.
- ``interpolate(a, b, alpha)`` / ``Interpolator``: weights along the linear path.
- ``barrier(a, b, data, metric="loss" | "error" | evaluate metric, alphas=11)``.
- ``linear_cka(X, Y)``, ``layerwise_cka(a, b, data, pooling="cls" | "mean" | "all")``.
- ``disagreement(a, b, data)``.
- ``hf_stability.analysis.alignment``: permutation alignment.

Evaluation is batched under ``torch.inference_mode`` (optionally under bf16/fp16 autocast) and
sharded over the processes of an ``accelerate launch`` through ``Evaluator``.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "AnalyzeArguments": ".arguments",
    "AlignmentMethod": ".arguments",
    "Autocast": ".arguments",
    "Pairs": ".arguments",
    "Pooling": ".arguments",
    "Report": ".schema",
    "REPORT_SCHEMA_VERSION": ".schema",
    "BarrierResult": ".schema",
    "analyze_run": ".runner",
    "barrier": ".path_barriers",
    "barriers": ".path_barriers",
    "barrier_from_values": ".path_barriers",
    "check_same_architecture": ".compare",
    "layer_of": ".compare",
    "L2Result": ".distance",
    "l2_distance": ".distance",
    "EvalData": ".evaluation",
    "EvalSums": ".evaluation",
    "Evaluator": ".evaluation",
    "Interpolator": ".interpolation",
    "default_alphas": ".interpolation",
    "interpolate": ".interpolation",
    "RepresentationResult": ".representations",
    "compare_representations": ".representations",
    "disagreement": ".representations",
    "layerwise_cka": ".representations",
    "linear_cka": ".representations",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
