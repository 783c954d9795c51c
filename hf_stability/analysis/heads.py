"""How each head the Trainer trains is measured: its loss, what counts as an error, which
predictions two models can disagree on, and which token its own classifier reads.

The loss is the one the model itself computes from its labels (``outputs.loss``), so a head we
never heard of still gets a correct loss barrier; batches are weighted by how many label entries
the loss averages over (entries labelled -100 are ignored), so the dataset's loss is the same
in 1 or N processes. The error rule and the predictions depend on the head:

| head | error (and disagreement) counted over | rule |
|---|---|---|
| single-label classification, multiple choice, image classification | examples | argmax of the logits |
| multi-label classification | (example, label) entries | sign of each logit |
| regression (num_labels=1) | none: no error barrier, no disagreement | |
| token classification | tokens not labelled -100 | argmax of the logits |
| extractive question answering | examples | the argmax start and end, both right |
| causal language model | next tokens not labelled -100 | argmax of the logits |
| anything else | none | |

A head whose loss is the mean cross-entropy of next tokens (a causal language model) also has a
perplexity, exp(loss), and so a perplexity barrier along the path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import base_of, is_peft_model
from ..errors import AnalysisDataError
from .arguments import Pooling

#: The batch keys that hold labels, for the heads that have them.
LABEL_KEYS = ("labels", "start_positions", "end_positions")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Judged:
    """What a head predicts at the units its error is counted over, and whether each is right."""

    predictions: torch.Tensor  # [units] or [units, k]: compared between two models for disagreement
    correct: torch.Tensor  # [units] bool


class Head:
    """One kind of head (see the module docstring). Subclasses say how to count and judge."""

    name = "unknown head"
    error_rule: str | None = None  # None: no error barrier and no disagreement for this head
    perplexity_rule: str | None = None  # None: its loss is no per-token cross-entropy, so it has no perplexity

    def outputs(self, model: nn.Module, inputs: dict[str, Any], labels: dict[str, torch.Tensor]) -> Any:
        """The model's outputs, with the loss it computes from ``labels``."""
        return call(model, {**inputs, **labels})

    def loss_units(self, labels: dict[str, torch.Tensor]) -> torch.Tensor | int:
        """How many entries the model's (mean) loss averages over in this batch (a device tensor
        where it depends on the labels' values: no host synchronisation)."""
        target = labels.get("labels")
        if target is None:
            target = next(iter(labels.values()))
        if target.is_floating_point():
            return target.numel()
        return (target != IGNORE_INDEX).sum()

    def loss(self, outputs: Any, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = getattr(outputs, "loss", None) if not isinstance(outputs, dict) else outputs.get("loss")
        if loss is None:
            raise AnalysisDataError(
                f"The model ({self.name}) computes no loss from its labels ({sorted(labels)}): the loss barrier needs "
                "a head that returns one (transformers' *For... classes do when given labels)."
            )
        return loss

    def judge(self, outputs: Any, labels: dict[str, torch.Tensor]) -> Judged | None:
        return None

    def fp32_loss(self, outputs: Any, labels: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The loss transformers' head computes, in float32 from the logits (None: the head has no
        such rule). A model in bf16 returns its loss rounded to bf16 (a relative error up to 2^-9
        per batch, as large as the barriers measured); the Evaluator uses this one instead, where
        it agrees with the model's own loss to bf16 precision on every batch."""
        return None

    def count(self, outputs: Any, labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | int] | None:
        """(wrong, judged) of a batch under the error rule, without a host synchronisation (None:
        no error rule). The same counts as ``judge``; heads that judge a subset of tokens count
        it by masking rather than indexing (indexing by a mask waits for the GPU)."""
        judged = self.judge(outputs, labels)
        if judged is None:
            return None
        return (~judged.correct).sum(), judged.correct.numel()


def call(model: nn.Module, batch: dict[str, Any]) -> Any:
    """A transformers model (keyword inputs) or a timm / plain model (one tensor input)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel) or is_peft_model(model):
        return model(**batch)
    inputs = batch.get("pixel_values", batch.get("input"))
    if inputs is None:
        raise AnalysisDataError(f"Cannot tell the input of a {type(model).__name__}: batch keys are {sorted(batch)}.")
    return model(inputs)


def logits_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    return outputs["logits"] if isinstance(outputs, dict) else outputs.logits


class SingleLabel(Head):
    name = "single-label classification"
    error_rule = "argmax of the logits against the label, per example"

    def judge(self, outputs, labels):
        predicted = logits_of(outputs).argmax(-1)
        return Judged(predicted, predicted == labels["labels"])

    def fp32_loss(self, outputs, labels):
        logits = logits_of(outputs)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels["labels"].reshape(-1))


class PlainLogits(SingleLabel):
    """A model that returns logits and no loss (a timm or plain torch classifier): the loss is
    the cross-entropy of its logits."""

    name = "classifier without a loss of its own"

    def outputs(self, model, inputs, labels):
        return call(model, inputs)

    def loss(self, outputs, labels):
        return F.cross_entropy(logits_of(outputs).float(), labels["labels"])


class MultiLabel(Head):
    name = "multi-label classification"
    error_rule = "sign of each logit against each 0/1 label, per (example, label) entry"

    def judge(self, outputs, labels):
        predicted = logits_of(outputs) > 0
        truth = labels["labels"] > 0.5
        return Judged(predicted.reshape(-1), (predicted == truth).reshape(-1))

    def fp32_loss(self, outputs, labels):
        return F.binary_cross_entropy_with_logits(logits_of(outputs).float(), labels["labels"].float())


class Regression(Head):
    name = "regression"


class TokenClassification(Head):
    name = "token classification"
    error_rule = "argmax of the logits against the label, per token not labelled -100"

    def judge(self, outputs, labels):
        target = labels["labels"]
        keep = target != IGNORE_INDEX
        predicted = logits_of(outputs).argmax(-1)[keep]
        return Judged(predicted, predicted == target[keep])

    def count(self, outputs, labels):
        target = labels["labels"]
        keep = target != IGNORE_INDEX
        return ((logits_of(outputs).argmax(-1) != target) & keep).sum(), keep.sum()

    def fp32_loss(self, outputs, labels):
        logits = logits_of(outputs)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels["labels"].reshape(-1),
                               ignore_index=IGNORE_INDEX)


class QuestionAnswering(Head):
    name = "extractive question answering"
    error_rule = "argmax start and end positions against the answer's, both right, per example"

    def loss_units(self, labels):
        return labels["start_positions"].numel()

    def judge(self, outputs, labels):
        start, end = outputs.start_logits.argmax(-1), outputs.end_logits.argmax(-1)
        predicted = torch.stack([start, end], dim=-1)
        correct = (start == labels["start_positions"].reshape(-1)) & (end == labels["end_positions"].reshape(-1))
        return Judged(predicted, correct)


class CausalLM(Head):
    name = "causal language model"
    error_rule = "argmax of the logits against the next token, per token not labelled -100"
    perplexity_rule = "exp of the mean next-token cross-entropy over the tokens not labelled -100"

    def loss_units(self, labels):
        return (labels["labels"][..., 1:] != IGNORE_INDEX).sum()

    def judge(self, outputs, labels):
        target = labels["labels"][..., 1:]
        keep = target != IGNORE_INDEX
        predicted = logits_of(outputs)[..., :-1, :].argmax(-1)[keep]
        return Judged(predicted, predicted == target[keep])

    def count(self, outputs, labels):
        target = labels["labels"][..., 1:]
        keep = target != IGNORE_INDEX
        return ((logits_of(outputs)[..., :-1, :].argmax(-1) != target) & keep).sum(), keep.sum()


def head_of(model: nn.Module, batch: dict[str, Any]) -> Head:
    """The head of ``model``, from its class, its config and one batch of its data."""
    from transformers import PreTrainedModel

    inner = base_of(model)
    name = type(inner).__name__
    if "start_positions" in batch and "end_positions" in batch:
        return QuestionAnswering()
    if not isinstance(inner, PreTrainedModel):
        return PlainLogits()
    labels = batch.get("labels")
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return CausalLM()
    if name.endswith("ForTokenClassification"):
        return TokenClassification()
    if name.endswith("ForMultipleChoice"):
        return SingleLabel()
    config = getattr(inner, "config", None)
    problem = getattr(config, "problem_type", None)
    if problem == "regression" or (problem is None and getattr(config, "num_labels", 2) == 1):
        return Regression()
    if problem == "multi_label_classification" or (
            problem is None and isinstance(labels, torch.Tensor) and labels.is_floating_point() and labels.dim() == 2):
        return MultiLabel()
    if name.endswith(("ForSequenceClassification", "ForImageClassification")) or "Classification" in name:
        return SingleLabel()
    return Head()


#: The Hub pipeline task of a model class, by the end of its name (the first that matches).
PIPELINE_TASKS = (
    (("ForCausalLM", "LMHeadModel"), "text-generation"),
    (("ForTokenClassification",), "token-classification"),
    (("ForQuestionAnswering",), "question-answering"),
    (("ForMultipleChoice",), "multiple-choice"),
    (("ForMaskedLM",), "fill-mask"),
    (("ForImageClassification", "VisionTransformer"), "image-classification"),
)


def pipeline_task(model_class: str | None) -> str:
    """The Hub task (pipeline tag) of a model class name: "text-generation" for a causal language
    model, "image-classification" for an image classifier... and "text-classification" otherwise."""
    name = model_class or ""
    for endings, task in PIPELINE_TASKS:
        if name.endswith(endings):
            return task
    return "image-classification" if "Image" in name else "text-classification"


def labels_of(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The label tensors of a batch (see LABEL_KEYS)."""
    return {k: batch[k] for k in LABEL_KEYS if isinstance(batch.get(k), torch.Tensor)}


@dataclass(frozen=True)
class Readout:
    """Which token(s) a representation is read from (CKA): ``pooling`` and, for ``mean``, how
    many leading (prefix) tokens the model's own head skips; ``reason`` says why."""

    pooling: Pooling
    skip: int = 0
    reason: str = ""


def head_readout(model: nn.Module) -> Readout:
    """The tokens the model's own head reads: CLS for BERT-like encoders and ViT, the last
    non-padding token for decoder classifiers, the mean of the patch tokens for mean-pooling
    heads (BEiT, Swin, ModernBERT with mean pooling, timm's avg pooling), every token for heads
    that predict per token."""
    inner = base_of(model)
    name = type(inner).__name__
    config = getattr(inner, "config", None)
    timm_model = getattr(inner, "timm_model", None) or (inner if type(inner).__module__.startswith("timm.") else None)
    if timm_model is not None:
        if getattr(timm_model, "global_pool", "token") in ("avg", "avgmax", "max"):
            return Readout(Pooling.MEAN, int(getattr(timm_model, "num_prefix_tokens", 1)),
                           "the timm head averages the patch tokens")
        return Readout(Pooling.CLS, reason="the timm head reads the class token")
    if name.endswith(("ForTokenClassification", "ForQuestionAnswering", "ForCausalLM", "LMHeadModel")):
        return Readout(Pooling.ALL, reason="the head predicts at every token")
    model_type = getattr(config, "model_type", "")
    if model_type in ("gpt2", "llama", "mistral", "qwen2", "gemma", "gemma2", "phi", "phi3", "opt", "gpt_neox",
                      "falcon", "mixtral", "qwen3"):
        return Readout(Pooling.LAST, reason="a decoder classifier reads the last non-padding token")
    if model_type == "swin" or model_type == "convnext":
        return Readout(Pooling.MEAN, 0, "the head averages every token")
    if model_type in ("beit", "data2vec-vision") and getattr(config, "use_mean_pooling", True):
        return Readout(Pooling.MEAN, 1, "the head averages the patch tokens (not the class token)")
    if model_type == "modernbert" and getattr(config, "classifier_pooling", "cls") == "mean":
        return Readout(Pooling.MEAN, 0, "ModernBERT's classifier averages the tokens (classifier_pooling mean)")
    return Readout(Pooling.CLS, reason="the head reads the first (class) token")
