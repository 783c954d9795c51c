"""Loss, error and (for language models) perplexity barriers along the linear path between two
models."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ..errors import AnalysisDataError
from .evaluation import EvalData, EvalSums, Evaluator
from .heads import Head
from .interpolation import Interpolator, default_alphas
from .schema import BarrierResult

BUILTIN_METRICS = ("loss", "error", "perplexity")


def barrier_from_values(alphas: Sequence[float], values: Sequence[float]) -> float:
    """The barrier of a metric measured along the path, the largest gap over the straight line
    between the endpoints (the first and last values): max_a [m(a) - ((1 - a) m(0) + a m(1))]."""
    first, last = values[0], values[-1]
    return max(v - ((1.0 - a) * first + a * last) for a, v in zip(alphas, values))


def gap_at_peak(alphas: Sequence[float], values: Sequence[float]) -> float:
    """The barrier as the paper's code reports it: the gap over the straight line at the path's
    highest point a* = argmax_a m(a). Equal to ``barrier_from_values`` when the endpoints' values
    are equal (the line is then flat, so the highest point is the largest gap)."""
    first, last = values[0], values[-1]
    peak = max(range(len(values)), key=lambda i: values[i])
    return values[peak] - ((1.0 - alphas[peak]) * first + alphas[peak] * last)


def _as_alphas(alphas: int | Sequence[float]) -> list[float]:
    points = default_alphas(alphas) if isinstance(alphas, int) else [float(a) for a in alphas]
    if points[0] != 0.0 or points[-1] != 1.0 or sorted(points) != points:
        raise ValueError(f"alphas must increase from 0 to 1, got {points}.")
    return points


def _metric_value(metric: Any, sums: EvalSums, head: Head) -> float | None:
    """Lower-is-better value of a metric: loss, error (None for a head without an error rule),
    perplexity (exp of the loss; None for a head whose loss is no per-token cross-entropy), or
    1 - value of an evaluate metric."""
    if metric == "loss":
        return sums.loss
    if metric == "error":
        return sums.error
    if metric == "perplexity":
        if not head.perplexity_rule:
            return None
        return math.exp(sums.loss) if sums.loss < 700.0 else math.inf  # (math.exp raises past ~709)
    result = metric.compute(predictions=sums.predictions, references=sums.references)
    value = float(next(iter(result.values())))
    return 1.0 - value


def _metric_name(metric: Any) -> str:
    return metric if isinstance(metric, str) else getattr(metric, "name", type(metric).__name__)


def _resolve_metrics(metrics: Sequence[Any]) -> list[Any]:
    from ..metrics import load_metric

    return [m if not isinstance(m, str) or m in BUILTIN_METRICS else load_metric(m) for m in metrics]


def barriers(
    a: nn.Module,
    b: nn.Module,
    data: EvalData,
    metrics: Sequence[Any] = BUILTIN_METRICS,
    alphas: int | Sequence[float] = 11,
    evaluator: Evaluator | None = None,
    endpoints: tuple[EvalSums | None, EvalSums | None] = (None, None),
) -> dict[str, BarrierResult]:
    """Barriers of several metrics from one pass per interpolation point. A metric the head
    cannot give (the error of a regression head, the perplexity of a classifier) is left out of
    the result.

    ``endpoints`` may hold already computed sums of ``a`` and ``b`` on ``data`` (the analyzer
    evaluates the parent once for all its children).
    """
    evaluator = evaluator or Evaluator()
    metrics = _resolve_metrics(metrics)
    points = _as_alphas(alphas)
    keep = any(not isinstance(m, str) for m in metrics)
    head = evaluator.head(a, data)
    interpolator = Interpolator(a, b, dtype=evaluator.weights_dtype)
    sums: list[EvalSums] = []
    progress = tqdm(points, desc=f"barrier on {data.name}", disable=not evaluator.progress, leave=False)
    for i, alpha in enumerate(progress):
        cached = endpoints[0] if i == 0 else endpoints[1] if i == len(points) - 1 else None
        if cached is not None and (not keep or cached.predictions is not None):
            sums.append(cached)
            continue
        sums.append(evaluator.evaluate(interpolator.set_alpha(alpha), data, keep_predictions=keep, head=head))
    results = {}
    for metric in metrics:
        values = [_metric_value(metric, s, head) for s in sums]
        if any(v is None for v in values):
            continue
        results[_metric_name(metric)] = BarrierResult(
            metric=_metric_name(metric),
            alphas=points,
            values=values,
            endpoint_a=values[0],
            endpoint_b=values[-1],
            barrier=barrier_from_values(points, values),
            gap_at_peak=gap_at_peak(points, values),
        )
    return results


def barrier(
    a: nn.Module,
    b: nn.Module,
    data: Any,
    metric: Any = "loss",
    alphas: int | Sequence[float] = 11,
    *,
    batch_size: int = 64,
    collate_fn: Any = None,
    evaluator: Evaluator | None = None,
) -> BarrierResult:
    """The barrier of ``metric`` ("loss", "error", "perplexity" for a language model, a shipped
    metric name or an evaluate module) between ``a`` and ``b`` on ``data`` (a dataset of labelled
    feature dicts, or ``EvalData``)."""
    if not isinstance(data, EvalData):
        data = EvalData(data, batch_size=batch_size, collate_fn=collate_fn)
    found = barriers(a, b, data, [metric], alphas, evaluator)
    if not found:
        head = (evaluator or Evaluator()).head(a, data)
        raise AnalysisDataError(f"A {head.name} head has no {_metric_name(metric)} rule: measure its loss barrier.")
    return next(iter(found.values()))
