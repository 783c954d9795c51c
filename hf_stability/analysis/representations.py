"""Representation similarity (linear CKA, per layer) and prediction disagreement of two models."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters import base_of
from ..errors import AnalysisDataError
from .arguments import Pooling
from .evaluation import EvalData, Evaluator
from .heads import IGNORE_INDEX, Head, Readout, TokenClassification, call, head_readout, labels_of


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


def _last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the last position whose mask is 1 (right or left padding)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask.long()).argmax(dim=1)


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, readout: Readout) -> torch.Tensor:
    """One row per example (cls, last, mean) or per kept token (all) of a layer's hidden states."""
    if hidden.dim() == 2:
        return hidden
    if hidden.dim() == 4:  # a convolutional feature map [B, C, H, W]: its spatial mean
        return hidden.mean(dim=(2, 3))
    if readout.pooling == Pooling.CLS:
        return hidden[:, 0]
    if mask is None:
        mask = torch.ones(hidden.shape[:2], device=hidden.device)
    if readout.pooling == Pooling.LAST:
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), _last_positions(mask)]
    if readout.skip:
        hidden, mask = hidden[:, readout.skip:], mask[:, readout.skip:]
    weights = mask.to(hidden.dtype)
    if readout.pooling == Pooling.MEAN:
        return (hidden * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
    return hidden[mask.bool()]


def resolve_readout(model: nn.Module, pooling: Pooling | str) -> Readout:
    """The readout of ``pooling``; ``auto``: the one the model's own head reads (heads.head_readout)."""
    pooling = Pooling(pooling)
    return head_readout(model) if pooling == Pooling.AUTO else Readout(pooling, reason="asked for")


def layer_outputs(model: nn.Module, batch: dict[str, Any]) -> tuple[list[str], list[torch.Tensor], Any]:
    """Hidden states of every layer and the outputs: transformers models through
    ``output_hidden_states``, timm-style models through hooks on ``model.blocks``."""
    from transformers import PreTrainedModel

    inner = base_of(model)
    # transformers' TimmWrapper returns timm's intermediates as feature maps: hook its timm blocks instead
    wrapped_timm = getattr(inner, "timm_model", None) if isinstance(inner, PreTrainedModel) else None
    if isinstance(inner, PreTrainedModel) and wrapped_timm is None:
        out = call(model, {**batch, "output_hidden_states": True})
        hidden = list(out.hidden_states)
        names = ["embeddings"] + [f"layer.{i}" for i in range(len(hidden) - 1)]
        return names, hidden, out
    blocks = getattr(wrapped_timm if wrapped_timm is not None else model, "blocks", None)
    if blocks is None:
        raise AnalysisDataError(
            f"Cannot read the layers of a {type(model).__name__}: expected a transformers model or a model with "
            "a .blocks list (timm VisionTransformer)."
        )
    captured: list[torch.Tensor] = []
    handles = [block.register_forward_hook(lambda _m, _i, o: captured.append(o)) for block in blocks]
    try:
        out = call(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return [f"blocks.{i}" for i in range(len(captured))], captured, out


@dataclass
class RepresentationResult:
    """Linear CKA per layer (``layers[i]`` -> ``cka[i]``) and the disagreement of the two models'
    predictions under their head's rule (None for a head without one, as a regression's)."""

    pooling: str
    layers: list[str] = field(default_factory=list)
    cka: list[float] = field(default_factory=list)
    disagreement: float | None = 0.0
    count: int = 0
    readout: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first_example(data: EvalData) -> dict[str, Any]:
    return {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in data.batch(0).items()}


def _token_mask(inputs: dict[str, Any], labels: dict[str, torch.Tensor], head: Head) -> torch.Tensor | None:
    """The tokens a representation may be read from: not padding, and for a token classifier not
    labelled -100 either (special tokens and sub-word continuations)."""
    mask = inputs.get("attention_mask")
    if isinstance(head, TokenClassification):
        keep = labels["labels"] != IGNORE_INDEX
        mask = keep if mask is None else mask.bool() & keep
    return mask


@torch.inference_mode()
def compare_representations(
    a: nn.Module, b: nn.Module, data: EvalData, pooling: Pooling | str = Pooling.AUTO,
    evaluator: Evaluator | None = None,
) -> RepresentationResult:
    """CKA per layer and disagreement of ``a`` and ``b`` on ``data``, from sums reduced over processes.

    Linear CKA needs only additive statistics (X^T X, Y^T Y, X^T Y, column sums, n), so each
    process accumulates its shard and the sums are reduced: the result is exact in N processes.
    """
    evaluator = evaluator or Evaluator()
    readout = resolve_readout(a, pooling)
    evaluator.ready(a, b)
    head = evaluator.head(a, data)
    # the layer names and widths, from one example, so that every process holds sums of the same shapes
    probe = evaluator._to_device(_first_example(data))
    names, hidden, _ = layer_outputs(a, {k: v for k, v in probe.items() if k not in labels_of(probe)})
    device, f64 = evaluator.device, torch.float64
    widths = [pool(h, None, readout).shape[-1] for h in hidden]
    sums = [
        [torch.zeros(w, w, dtype=f64, device=device) for _ in range(3)]
        + [torch.zeros(w, dtype=f64, device=device) for _ in range(2)]
        + [torch.zeros((), dtype=f64, device=device)]
        for w in widths
    ]
    counts = torch.zeros(2, dtype=f64, device=device)  # differing predictions, judged entries
    for _, inputs, labels in evaluator.batches(data, desc=f"CKA on {data.name}"):
        mask = _token_mask(inputs, labels, head)
        with evaluator.autocast():
            _, hidden_a, out_a = layer_outputs(a, inputs)
            _, hidden_b, out_b = layer_outputs(b, inputs)
        judged_a, judged_b = (head.judge(out, labels) if labels else None for out in (out_a, out_b))
        if judged_a is not None and judged_b is not None:
            differ = judged_a.predictions != judged_b.predictions
            counts[0] += (differ.reshape(differ.shape[0], -1).any(-1) if differ.dim() > 1 else differ).sum()
            counts[1] += differ.shape[0]
        for terms, ha, hb in zip(sums, hidden_a, hidden_b):
            x, y = pool(ha, mask, readout).double(), pool(hb, mask, readout).double()
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
    return RepresentationResult(pooling=readout.pooling.value, layers=names, cka=ckas,
                                disagreement=differ / count if count else None, count=int(count),
                                readout=readout.reason)


def layerwise_cka(a: nn.Module, b: nn.Module, data: Any, pooling: Pooling | str = Pooling.AUTO, *,
                  batch_size: int = 64, collate_fn: Any = None,
                  evaluator: Evaluator | None = None) -> RepresentationResult:
    """Linear CKA of every layer's representation of ``a`` and ``b`` (pooling: auto | cls | last |
    mean | all). The models are put in eval mode on the evaluator's device."""
    if not isinstance(data, EvalData):
        data = EvalData(data, batch_size=batch_size, collate_fn=collate_fn)
    return compare_representations(a, b, data, pooling, evaluator)


@torch.inference_mode()
def disagreement(a: nn.Module, b: nn.Module, data: Any, *, batch_size: int = 64, collate_fn: Any = None,
                 evaluator: Evaluator | None = None) -> float | None:
    """The fraction of judged entries (examples, tokens, label entries: heads.py) on which the
    predictions of ``a`` and ``b`` differ; None for a head without an error rule. The models are
    put in eval mode on the evaluator's device."""
    if not isinstance(data, EvalData):
        data = EvalData(data, batch_size=batch_size, collate_fn=collate_fn)
    evaluator = evaluator or Evaluator()
    evaluator.ready(a, b)
    head = evaluator.head(a, data)
    counts = torch.zeros(2, dtype=torch.float64, device=evaluator.device)
    for _, inputs, labels in evaluator.batches(data, desc=f"disagreement on {data.name}"):
        with evaluator.autocast():
            judged_a = head.judge(head.outputs(a, inputs, labels), labels)
            judged_b = head.judge(head.outputs(b, inputs, labels), labels)
        if judged_a is None:
            return None
        differ = judged_a.predictions != judged_b.predictions
        counts[0] += (differ.reshape(differ.shape[0], -1).any(-1) if differ.dim() > 1 else differ).sum()
        counts[1] += differ.shape[0]
    if evaluator.num_processes > 1:
        counts = evaluator.accelerator.reduce(counts, reduction="sum")
    differ, count = counts.tolist()
    return differ / count
