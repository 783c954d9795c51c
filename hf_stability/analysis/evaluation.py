"""Batched evaluation of models, sharded over the processes of an accelerate launch.

Batches are fixed once (the same batches in 1 or N processes); process r evaluates batches
r, r+N, r+2N... and the sums (the loss times the entries it averages over, errors, judged
entries) are reduced, so 1 and N processes give the same numbers up to the order of a float64
sum. What a loss, an error and a prediction are depends on the model's head (heads.py).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import AnalysisDataError
from .heads import LABEL_KEYS, Head, head_of, labels_of

logger = logging.getLogger(__name__)


def _default_collate(features: list[dict[str, Any]]) -> dict[str, Any]:
    from transformers import default_data_collator

    return default_data_collator(features)


def _examples(dataset: Any, start: int, stop: int) -> list[dict[str, Any]]:
    """Examples ``start`` to ``stop - 1`` as feature dicts. A ``datasets.Dataset`` without a format
    or transform is read as one slice (one Arrow-to-Python conversion per batch instead of one per
    example, the same dicts: benchmarks/eval_data_batching.py); anything else example by example."""
    arrow_format = getattr(dataset, "format", None) if hasattr(dataset, "column_names") else None
    if isinstance(arrow_format, dict) and "type" in arrow_format and arrow_format["type"] is None:
        columns = dataset[start:stop]
        if columns:  # (a dataset without columns: as before, example by example)
            names = list(columns)
            return [dict(zip(names, values)) for values in zip(*(columns[name] for name in names))]
    return [dataset[i] for i in range(start, stop)]


@dataclass
class EvalSums:
    """Sums over the evaluated data (already reduced over processes): the model's loss weighted
    by the entries it averages over, and the errors over the entries the head's error rule
    judges (``judged`` 0: the head has no error rule)."""

    loss_sum: float
    loss_units: float
    wrong: float
    judged: int
    predictions: list[Any] | None = None
    references: list[Any] | None = None

    @property
    def loss(self) -> float:
        return self.loss_sum / self.loss_units

    @property
    def error(self) -> float | None:
        return self.wrong / self.judged if self.judged else None

    @property
    def accuracy(self) -> float | None:
        return None if self.error is None else 1.0 - self.error


@dataclass
class EvalData:
    """A dataset cut into fixed batches: the unit the analyzer evaluates.

    ``dataset`` is anything indexable that returns feature dicts (a ``datasets.Dataset``);
    ``collate_fn`` turns a list of them into a batch (default: transformers'
    ``default_data_collator``). Collated batches are cached (and, by the Evaluator, kept on the
    GPU while they fit its share of its memory), so evaluating many models or interpolation
    points collates and copies once. ``labelled=False`` admits data without labels (enough
    for activation matching; barriers and disagreement need labels).
    """

    dataset: Any
    batch_size: int = 64
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None
    name: str = "data"
    pin_memory: bool = field(default_factory=torch.cuda.is_available)
    labelled: bool = True
    _cache: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)
    _device_cache: dict[tuple[str, str, int], dict[str, Any]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.dataset is None or len(self.dataset) == 0:
            raise AnalysisDataError(f"The {self.name} dataset is empty: give at least one labelled example.")
        if self.batch_size < 1:
            raise AnalysisDataError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.labelled:  # the labels may come from the collator (a language model's), so a batch is checked
            first = self.batch(0)
            if not any(key in first for key in LABEL_KEYS):
                raise AnalysisDataError(
                    f"The {self.name} dataset has no labels (a batch has {sorted(first)}): barriers, errors and "
                    f"disagreement need labels ({', '.join(LABEL_KEYS)}, or 'label')."
                )

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def num_batches(self) -> int:
        return (len(self.dataset) + self.batch_size - 1) // self.batch_size

    def batch(self, index: int) -> dict[str, Any]:
        if index not in self._cache:
            start = index * self.batch_size
            stop = min(start + self.batch_size, len(self.dataset))
            features = _examples(self.dataset, start, stop)
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
    ``weights_dtype``: evaluate losses and errors with the weights cast to this dtype (bf16: the
    analysis's ``bf16_full``; the Trainer's ``bf16_full_eval``) and no autocast; what reads
    hidden states (CKA, activation matching) still runs under ``autocast_dtype``.

    On a GPU the loop never waits for the device: batches stay on it (up to
    ``DEVICE_CACHE_SHARE`` of its free memory), sums accumulate there, and one transfer per
    evaluation brings them back.
    """

    #: The share of the GPU's free memory (at the first batch) that cached batches may take.
    DEVICE_CACHE_SHARE = 0.2
    #: How far (relative) a head's float32 loss may be from the bf16 model's own on a batch and
    #: still be taken for the same loss, more precisely computed (bf16 keeps 8 bits: 2^-8 = 0.4%).
    FP32_LOSS_TOLERANCE = 2.0**-6

    def __init__(
        self,
        accelerator: Any = None,
        device: str | torch.device | None = None,
        autocast_dtype: torch.dtype | None = None,
        progress: bool = True,
        weights_dtype: torch.dtype | None = None,
    ):
        self.accelerator = accelerator
        if accelerator is not None:
            self.device = accelerator.device
            self.process_index, self.num_processes = accelerator.process_index, accelerator.num_processes
        else:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self.process_index, self.num_processes = 0, 1
        self.autocast_dtype = autocast_dtype
        self.weights_dtype = weights_dtype
        self.progress = progress and self.process_index == 0
        self._cache_room: int | None = None  # bytes of device memory batches may still take

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

    def _inputs_in_weights_dtype(self, batch: dict[str, Any]) -> dict[str, Any]:
        """With ``weights_dtype``: the floating inputs (not the labels) in it, as the model would cast
        them itself (and must, for a model without such a cast: a timm model), images channels-last
        (the layout a GPU's convolutions read)."""
        if self.weights_dtype is None:
            return batch
        out = dict(batch)
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and key not in LABEL_KEYS:
                value = value.to(self.weights_dtype)
                out[key] = value.contiguous(memory_format=torch.channels_last) if value.dim() == 4 else value
        return out

    def _device_batch(self, data: EvalData, index: int) -> dict[str, Any]:
        """Batch ``index`` of ``data`` on this evaluator's device, kept there while it fits."""
        if self.device.type != "cuda":
            return self._inputs_in_weights_dtype(self._to_device(data.batch(index)))
        key = (str(self.device), str(self.weights_dtype), index)
        cached = data._device_cache.get(key)
        if cached is not None:
            return cached
        batch = self._inputs_in_weights_dtype(self._to_device(data.batch(index)))
        if self._cache_room is None:
            self._cache_room = int(self.DEVICE_CACHE_SHARE * torch.cuda.mem_get_info(self.device)[0])
        size = sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))
        if size <= self._cache_room:
            data._device_cache[key] = batch
            self._cache_room -= size
        return batch

    def batches(
        self, data: EvalData, desc: str = "", show: bool = True
    ) -> Iterator[tuple[int, dict[str, Any], dict[str, torch.Tensor]]]:
        """This process's batches on its device, as (batch index, model inputs, label tensors)."""
        indices = data.shard(self.process_index, self.num_processes)
        for index in tqdm(indices, desc=desc, disable=not (self.progress and show), leave=False):
            batch = self._device_batch(data, index)
            labels = labels_of(batch)
            yield index, {k: v for k, v in batch.items() if k not in labels}, labels

    def head(self, model: nn.Module, data: EvalData) -> Head:
        """The head of ``model`` (heads.py), read from its class, its config and ``data``'s first batch."""
        return head_of(model, data.batch(0))

    def in_weights_dtype(self, model: nn.Module) -> nn.Module:
        """``model`` itself, or (``weights_dtype`` set and ``model`` not in it) a copy cast to it."""
        if self.weights_dtype is None:
            return model
        floating = [t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()]
        if all(t.dtype == self.weights_dtype for t in floating):
            return model
        return copy.deepcopy(model).to(self.weights_dtype)

    @torch.inference_mode()
    def evaluate(self, model: nn.Module, data: EvalData, keep_predictions: bool = False, desc: str = "",
                 head: Head | None = None) -> EvalSums:
        """The loss ``model`` computes from its labels, summed over ``data`` (each batch weighted by
        the entries its loss averages over), and its errors under its head's rule.

        Sums stay on the device (float64) until the end: one host synchronisation per call.
        With ``weights_dtype``, the model is evaluated in it (a cast copy unless it already is),
        and the loss is the head's float32 loss where it has one (``Head.fp32_loss``) and that
        agrees with the model's own on every batch; otherwise the model's own, with a warning.
        """
        self.ready(model)
        head = head or self.head(model, data)
        model = self.in_weights_dtype(model)
        low_precision = self.weights_dtype is not None
        autocast = contextlib.nullcontext() if low_precision else self.autocast()
        # loss x units, units, wrong, judged, fp32 loss x units, batches whose fp32 loss is not the model's own
        totals = torch.zeros(6, dtype=torch.float64, device=self.device)
        predictions: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        fp32 = low_precision
        for index, inputs, labels in self.batches(data, desc, show=bool(desc)):
            with autocast:
                outputs = head.outputs(model, inputs, labels)
                loss = head.loss(outputs, labels).float()
            units = head.loss_units(labels)
            totals[0] += loss.double() * units
            totals[1] += units
            if fp32:
                exact = head.fp32_loss(outputs, labels)
                if exact is None:
                    fp32 = False
                else:
                    totals[4] += exact.double() * units
                    gap = (exact.double() - loss.double()).abs() / exact.double().abs().clamp_min(1e-3)
                    totals[5] += gap > self.FP32_LOSS_TOLERANCE
            if keep_predictions:
                judged = head.judge(outputs, labels)
                if judged is not None:
                    predictions.append((index, judged.predictions, labels["labels"]))
            counted = head.count(outputs, labels)
            if counted is not None:
                totals[2] += counted[0]
                totals[3] += counted[1]
        if self.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        loss_sum, loss_units, wrong, judged_count, fp32_sum, disagree = totals.tolist()
        if fp32 and not disagree:
            loss_sum = fp32_sum
        elif fp32:
            logger.warning("On %d batch(es) the %s head's float32 loss differs from the model's own by more than "
                           "%.1f%% (the model computes another loss: label smoothing, class weights...): the model's "
                           "own loss, rounded to %s, is used.", round(disagree), head.name,
                           100 * self.FP32_LOSS_TOLERANCE, str(self.weights_dtype).replace("torch.", ""))
        result = EvalSums(loss_sum=loss_sum, loss_units=loss_units, wrong=wrong, judged=round(judged_count))
        if keep_predictions:
            local = [(i, p.tolist(), r.tolist()) for i, p, r in predictions]
            ordered = sorted(self.gather(local))
            result.predictions = [p for _, preds, _ in ordered for p in preds]
            result.references = [r for _, _, refs in ordered for r in refs]
        return result
