"""Batched evaluation of classifiers, sharded over the processes of an accelerate launch.

Batches are fixed once (the same batches in 1 or N processes); process r evaluates batches
r, r+N, r+2N... and the sums (loss, correct, count) are reduced, so 1 and N processes give
the same numbers up to the order of a float64 sum.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import AnalysisDataError

LABEL_KEYS = ("labels", "label")


def _default_collate(features: list[dict[str, Any]]) -> dict[str, Any]:
    from transformers import default_data_collator

    return default_data_collator(features)


def forward_logits(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Logits of a transformers model (keyword inputs) or a timm/plain model (one tensor input)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model(**batch).logits
    inputs = batch.get("pixel_values", batch.get("input"))
    if inputs is None:
        raise AnalysisDataError(f"Cannot tell the input of a {type(model).__name__}: batch keys are {sorted(batch)}.")
    out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


@dataclass
class EvalSums:
    """Sums over the evaluated examples (already reduced over processes)."""

    loss_sum: float
    correct: float
    count: int
    predictions: list[int] | None = None
    references: list[int] | None = None

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count

    @property
    def accuracy(self) -> float:
        return self.correct / self.count

    @property
    def error(self) -> float:
        return 1.0 - self.accuracy


@dataclass
class EvalData:
    """A dataset cut into fixed batches: the unit the analyzer evaluates.

    ``dataset`` is anything indexable that returns feature dicts (a ``datasets.Dataset``);
    ``collate_fn`` turns a list of them into a batch (default: transformers'
    ``default_data_collator``). Collated batches are cached, so evaluating many models or
    interpolation points collates once. ``labelled=False`` admits data without labels (enough
    for activation matching; barriers and disagreement need labels).
    """

    dataset: Any
    batch_size: int = 64
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None
    name: str = "data"
    pin_memory: bool = field(default_factory=torch.cuda.is_available)
    labelled: bool = True
    _cache: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.dataset is None or len(self.dataset) == 0:
            raise AnalysisDataError(f"The {self.name} dataset is empty: give at least one labelled example.")
        first = self.dataset[0]
        if self.labelled and not any(key in first for key in LABEL_KEYS):
            raise AnalysisDataError(
                f"The {self.name} dataset has no labels (columns: {sorted(first)}): barriers, errors and "
                "disagreement need a 'labels' or 'label' column."
            )
        if self.batch_size < 1:
            raise AnalysisDataError(f"batch_size must be >= 1, got {self.batch_size}.")

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def num_batches(self) -> int:
        return (len(self.dataset) + self.batch_size - 1) // self.batch_size

    def batch(self, index: int) -> dict[str, Any]:
        if index not in self._cache:
            start = index * self.batch_size
            stop = min(start + self.batch_size, len(self.dataset))
            features = [self.dataset[i] for i in range(start, stop)]
            batch = dict((self.collate_fn or _default_collate)(features))
            if "labels" not in batch and "label" in batch:
                batch["labels"] = batch.pop("label")
            if self.pin_memory:
                batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            self._cache[index] = batch
        return self._cache[index]

    def shard(self, process_index: int, num_processes: int) -> list[int]:
        return list(range(process_index, self.num_batches, num_processes))


class Evaluator:
    """Runs models over ``EvalData`` on this process's shard and reduces the sums.

    ``accelerator``: an ``accelerate.Accelerator`` (None: one process on ``device``).
    ``autocast_dtype``: torch.bfloat16 or torch.float16 to evaluate under autocast.
    """

    def __init__(
        self,
        accelerator: Any = None,
        device: str | torch.device | None = None,
        autocast_dtype: torch.dtype | None = None,
        progress: bool = True,
    ):
        self.accelerator = accelerator
        if accelerator is not None:
            self.device = accelerator.device
            self.process_index, self.num_processes = accelerator.process_index, accelerator.num_processes
        else:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self.process_index, self.num_processes = 0, 1
        self.autocast_dtype = autocast_dtype
        self.progress = progress and self.process_index == 0

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of this evaluator (a no-op without autocast_dtype)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def gather(self, items: list[Any]) -> list[Any]:
        if self.num_processes <= 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def ready(self, *models: nn.Module) -> None:
        """Put the models in eval mode on this evaluator's device."""
        for model in models:
            model.eval()
            model.to(self.device)

    def batches(
        self, data: EvalData, desc: str = "", show: bool = True
    ) -> Iterator[tuple[int, dict[str, Any], torch.Tensor | None]]:
        """This process's batches on its device, as (batch index, model inputs, labels or None)."""
        indices = data.shard(self.process_index, self.num_processes)
        for index in tqdm(indices, desc=desc, disable=not (self.progress and show), leave=False):
            batch = self._to_device(data.batch(index))
            labels = batch.pop("labels", None)
            yield index, batch, labels

    @torch.inference_mode()
    def evaluate(self, model: nn.Module, data: EvalData, keep_predictions: bool = False, desc: str = "") -> EvalSums:
        """Sum of cross-entropy losses, number correct and number of examples of ``model`` on ``data``.

        Sums stay on the device (float64) until the end: one host synchronisation per call.
        """
        self.ready(model)
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, correct, count
        predictions: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for index, inputs, labels in self.batches(data, desc, show=bool(desc)):
            with self.autocast():
                logits = forward_logits(model, inputs).float()
            predicted = logits.argmax(dim=-1)
            totals[0] += F.cross_entropy(logits, labels, reduction="sum").double()
            totals[1] += (predicted == labels).sum()
            totals[2] += labels.numel()
            if keep_predictions:
                predictions.append((index, predicted, labels))
        if self.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        loss_sum, correct, count = totals.tolist()
        result = EvalSums(loss_sum=loss_sum, correct=correct, count=round(count))
        if keep_predictions:
            local = [(i, p.tolist(), r.tolist()) for i, p, r in predictions]
            ordered = sorted(self.gather(local))
            result.predictions = [p for _, preds, _ in ordered for p in preds]
            result.references = [r for _, _, refs in ordered for r in refs]
        return result
