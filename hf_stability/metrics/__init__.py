"""Evaluation metrics shipped as local evaluate modules, so they load offline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

METRICS_DIR = Path(__file__).parent


def available_metrics() -> list[str]:
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def load_metric(name: str) -> Any:
    """``evaluate.load`` of a metric shipped with hf_stability (offline), e.g. ``load_metric("accuracy")``."""
    import evaluate

    if name not in available_metrics():
        raise ValueError(f"Unknown metric {name!r}: hf_stability ships {available_metrics()}.")
    return evaluate.load(str(METRICS_DIR / name / f"{name}.py"))


def classification_metrics(name: str = "accuracy") -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` for the Trainer: argmax of the logits against the labels."""
    metric = load_metric(name)

    def compute_metrics(eval_prediction: Any) -> dict[str, float]:
        logits, labels = eval_prediction.predictions, eval_prediction.label_ids
        if isinstance(logits, tuple):
            logits = logits[0]
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=labels)

    return compute_metrics
