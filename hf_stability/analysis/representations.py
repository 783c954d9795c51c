"""Representation similarity (linear CKA, per layer) and prediction disagreement of two models."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import AnalysisDataError
from .arguments import Pooling
from .evaluation import EvalData, Evaluator, forward_logits


def _centered_gram_norms(sxx, syy, sxy, sx, sy, n) -> float:
    mx, my = sx / n, sy / n
    cxx = sxx - n * torch.outer(mx, mx)
    cyy = syy - n * torch.outer(my, my)
    cxy = sxy - n * torch.outer(mx, my)
    norm_x, norm_y = torch.linalg.matrix_norm(cxx), torch.linalg.matrix_norm(cyy)
    # A representation that is (numerically) the same for every example has no variance to
    # compare: CKA is undefined there (the [CLS] embedding before the first layer, for one).
    tiny = 1e-9
    if norm_x <= tiny * torch.linalg.matrix_norm(sxx) or norm_y <= tiny * torch.linalg.matrix_norm(syy):
        return float("nan")
    return float(cxy.pow(2).sum() / (norm_x * norm_y))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of two representations of the same n examples:
    ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F), columns centred, in float64.
    NaN when a representation does not vary over the examples."""
    if x.shape[0] != y.shape[0]:
        raise AnalysisDataError(f"CKA needs the same examples: got {x.shape[0]} and {y.shape[0]} rows.")
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    return _centered_gram_norms(x.T @ x, y.T @ y, x.T @ y, x.sum(0), y.sum(0), x.shape[0])


def _pool(hidden: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    if hidden.dim() == 2:
        return hidden
    if pooling == "cls":
        return hidden[:, 0]
    if mask is None:
        mask = torch.ones(hidden.shape[:2], device=hidden.device)
    mask = mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    return hidden[mask.bool()]


def layer_outputs(model: nn.Module, batch: dict[str, Any]) -> tuple[list[str], list[torch.Tensor], torch.Tensor]:
    """Hidden states of every layer and the logits: transformers models through
    ``output_hidden_states``, timm-style models through hooks on ``model.blocks``."""
    from transformers import PreTrainedModel

    # transformers' TimmWrapper returns timm's intermediates as feature maps: hook its timm blocks instead
    wrapped_timm = getattr(model, "timm_model", None) if isinstance(model, PreTrainedModel) else None
    if isinstance(model, PreTrainedModel) and wrapped_timm is None:
        out = model(**batch, output_hidden_states=True)
        hidden = list(out.hidden_states)
        names = ["embeddings"] + [f"layer.{i}" for i in range(len(hidden) - 1)]
        return names, hidden, out.logits
    blocks = getattr(wrapped_timm if wrapped_timm is not None else model, "blocks", None)
    if blocks is None:
        raise AnalysisDataError(
            f"Cannot read the layers of a {type(model).__name__}: expected a transformers model or a model with "
            "a .blocks list (timm VisionTransformer)."
        )
    captured: list[torch.Tensor] = []
    handles = [block.register_forward_hook(lambda _m, _i, o: captured.append(o)) for block in blocks]
    try:
        logits = forward_logits(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return [f"blocks.{i}" for i in range(len(captured))], captured, logits


@dataclass
class RepresentationResult:
    """Linear CKA per layer (``layers[i]`` -> ``cka[i]``) and the disagreement of the argmax predictions."""

    pooling: str
    layers: list[str] = field(default_factory=list)
    cka: list[float] = field(default_factory=list)
    disagreement: float = 0.0
    count: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first_example(data: EvalData) -> dict[str, Any]:
    return {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in data.batch(0).items()}


@torch.inference_mode()
def compare_representations(
    a: nn.Module, b: nn.Module, data: EvalData, pooling: str = "cls", evaluator: Evaluator | None = None
) -> RepresentationResult:
    """CKA per layer and disagreement of ``a`` and ``b`` on ``data``, from sums reduced over processes.

    Linear CKA needs only additive statistics (X^T X, Y^T Y, X^T Y, column sums, n), so each
    process accumulates its shard and the sums are reduced: the result is exact in N processes.
    """
    pooling = Pooling(pooling)
    evaluator = evaluator or Evaluator()
    evaluator.ready(a, b)
    # the layer names and widths, from one example, so that every process holds sums of the same shapes
    probe = evaluator._to_device(_first_example(data))
    probe.pop("labels", None)
    names, hidden, _ = layer_outputs(a, probe)
    device, f64 = evaluator.device, torch.float64
    sums = [
        [torch.zeros(h.shape[-1], h.shape[-1], dtype=f64, device=device) for _ in range(3)]
        + [torch.zeros(h.shape[-1], dtype=f64, device=device) for _ in range(2)]
        + [torch.zeros((), dtype=f64, device=device)]
        for h in hidden
    ]
    counts = torch.zeros(2, dtype=f64, device=device)  # differing predictions, examples
    for _, inputs, labels in evaluator.batches(data, desc=f"CKA on {data.name}"):
        mask = inputs.get("attention_mask")
        with evaluator.autocast():
            _, hidden_a, logits_a = layer_outputs(a, inputs)
            _, hidden_b, logits_b = layer_outputs(b, inputs)
        counts[0] += (logits_a.argmax(-1) != logits_b.argmax(-1)).sum()
        counts[1] += labels.numel()
        for terms, ha, hb in zip(sums, hidden_a, hidden_b):
            x, y = _pool(ha, mask, pooling).double(), _pool(hb, mask, pooling).double()
            terms[0] += x.T @ x
            terms[1] += y.T @ y
            terms[2] += x.T @ y
            terms[3] += x.sum(0)
            terms[4] += y.sum(0)
            terms[5] += x.shape[0]
    if evaluator.num_processes > 1:
        sums = [[evaluator.accelerator.reduce(t, reduction="sum") for t in terms] for terms in sums]
        counts = evaluator.accelerator.reduce(counts, reduction="sum")
    differ, count = counts.tolist()
    ckas = [_centered_gram_norms(*terms[:5], terms[5]) for terms in sums]
    return RepresentationResult(pooling=pooling, layers=names, cka=ckas, disagreement=differ / count, count=int(count))


def layerwise_cka(a: nn.Module, b: nn.Module, data: Any, pooling: str = "cls", *, batch_size: int = 64,
                  collate_fn: Any = None, evaluator: Evaluator | None = None) -> RepresentationResult:
    """Linear CKA of every layer's representation of ``a`` and ``b`` (pooling: cls | mean | all).
    The models are put in eval mode on the evaluator's device."""
    if not isinstance(data, EvalData):
        data = EvalData(data, batch_size=batch_size, collate_fn=collate_fn)
    return compare_representations(a, b, data, pooling, evaluator)


@torch.inference_mode()
def disagreement(a: nn.Module, b: nn.Module, data: Any, *, batch_size: int = 64, collate_fn: Any = None,
                 evaluator: Evaluator | None = None) -> float:
    """Fraction of examples on which the argmax predictions of ``a`` and ``b`` differ.
    The models are put in eval mode on the evaluator's device."""
    if not isinstance(data, EvalData):
        data = EvalData(data, batch_size=batch_size, collate_fn=collate_fn)
    evaluator = evaluator or Evaluator()
    evaluator.ready(a, b)
    counts = torch.zeros(2, dtype=torch.float64, device=evaluator.device)  # differing predictions, examples
    for _, inputs, labels in evaluator.batches(data, desc=f"disagreement on {data.name}"):
        with evaluator.autocast():
            counts[0] += (forward_logits(a, inputs).argmax(-1) != forward_logits(b, inputs).argmax(-1)).sum()
        counts[1] += labels.numel()
    if evaluator.num_processes > 1:
        counts = evaluator.accelerator.reduce(counts, reduction="sum")
    differ, count = counts.tolist()
    return differ / count
