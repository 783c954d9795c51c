"""Metrics shipped as local evaluate modules load offline and compute exactly."""

import numpy as np
import pytest
from transformers import EvalPrediction

from hf_stability.metrics import available_metrics, classification_metrics, load_metric


def test_accuracy_loads_offline_and_counts_exactly():
    metric = load_metric("accuracy")
    assert metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]) == {"accuracy": 0.75}
    assert metric.compute(predictions=[0, 1], references=[1, 1], normalize=False) == {"accuracy": 1.0}
    weighted = metric.compute(predictions=[0, 1], references=[0, 0], sample_weight=[3.0, 1.0])
    assert weighted["accuracy"] == pytest.approx(0.75)


def test_compute_metrics_takes_the_argmax_of_logits():
    compute = classification_metrics()
    logits = np.array([[0.1, 0.9, 0.0], [2.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    assert compute(EvalPrediction(predictions=logits, label_ids=np.array([1, 0, 0]))) == {"accuracy": 2 / 3}


def test_unknown_metric_lists_the_shipped_ones():
    assert "accuracy" in available_metrics()
    with pytest.raises(ValueError, match="ships"):
        load_metric("bleu")
