"""Image classification study: a Vision Transformer (transformers ViT, or a timm ViT through
transformers' TimmWrapper) trained from random initialisation or fine-tuned from a pretrained
folder, on Fashion-MNIST (offline) or any dataset with image and label columns.

Both model types are ``PreTrainedModel``s: the run directory's ``final/`` folders load with
``from_pretrained`` (the analyzer needs nothing else), and a timm ViT keeps timm's own modules
(``timm_model.blocks.*``), which the permutation alignment knows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from transformers import (
    AutoModelForImageClassification,
    PreTrainedModel,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    default_data_collator,
)

from ..data import load_fashion_mnist
from ..data.hub import load_named, load_named_dataset
from ..enums import ExplicitEnum
from ..errors import StudyArgumentsError
from ..metrics import classification_metrics
from ..training import StabilityArguments, StabilityTrainer


class ImageModelType(ExplicitEnum):
    """Which Vision Transformer implementation an image study trains."""

    __label__ = "model_type"
    __error__ = StudyArgumentsError
    VIT = "vit"  # transformers' ViTForImageClassification
    TIMM = "timm"  # a timm VisionTransformer through transformers' TimmWrapperForImageClassification
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
#: Fashion-MNIST's pixel mean and std (over the training set), used to normalise its images.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


@dataclass
class ImageModelArguments:
    """Which Vision Transformer an image study trains."""

    model_type: ImageModelType = field(
        default=ImageModelType.VIT, metadata={"help": "'vit' (transformers ViT) or 'timm' (timm ViT)."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A pretrained model folder (e.g. from recipes/pretrain_vit.py) or Hub name; none: random "
                  "initialisation with the sizes below."},
    )
    timm_architecture: str = field(
        default="vit_tiny_patch16_224", metadata={"help": "timm model name (model_type timm), resized below."}
    )
    image_size: int = field(default=28, metadata={"help": "Input image side in pixels."})
    patch_size: int = field(default=4, metadata={"help": "Patch side in pixels."})
    hidden_size: int = field(default=192, metadata={"help": "Width of the residual stream."})
    num_hidden_layers: int = field(default=6, metadata={"help": "Transformer blocks."})
    num_attention_heads: int = field(default=3, metadata={"help": "Attention heads per block."})
    intermediate_size: int = field(default=768, metadata={"help": "Width of the MLP."})
    fresh_head: bool = field(
        default=True,
        metadata={"help": "When fine-tuning a pretrained model: start from a new classifier head (seeded N(0, "
                  "0.02) weights, zero bias), as for a new task."},
    )

    def __post_init__(self) -> None:
        self.model_type = ImageModelType(self.model_type)
        if self.image_size % self.patch_size:
            raise StudyArgumentsError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}: choose a patch "
                "size that divides the image."
            )
        if self.hidden_size % self.num_attention_heads:
            raise StudyArgumentsError(
                f"hidden_size {self.hidden_size} does not split into {self.num_attention_heads} heads."
            )


@dataclass
class ImageDataArguments:
    """Which images an image study uses."""

    dataset: str = field(
        default="fashion_mnist",
        metadata={"help": "'fashion_mnist' (offline, Debian package) or a Hub/local dataset with image and label "
                  "columns."},
    )
    classes: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3, 4],
        metadata={"help": "Keep these labels only, renumbered 0..n-1 in this order."},
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the image."})
    label_column: str = field(default="label", metadata={"help": "Column holding the integer label."})
    eval_split: str = field(default="test", metadata={"help": "Split used for evaluation."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation examples."})

    def __post_init__(self) -> None:
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise StudyArgumentsError(f"classes must be distinct labels, at least one; got {self.classes}.")


def load_image_splits(args: ImageDataArguments) -> DatasetDict:
    """Train and eval splits with ``pixel_values`` (converted to grey, normalised with
    Fashion-MNIST's mean and std, shape [1, H, W]) and ``labels`` (0..n-1 in the order of
    ``args.classes``), as torch tensors."""
    if args.dataset == "fashion_mnist":
        # (the first examples of the kept classes, as selected below: decoding the rest would only cost time)
        limited = None if None in (args.max_train_samples, args.max_eval_samples) else max(
            args.max_train_samples, args.max_eval_samples)
        splits = load_fashion_mnist(classes=list(args.classes), max_per_split=limited)
    else:
        splits = load_named_dataset(args.dataset, ("fashion_mnist",))
    limits = {"train": args.max_train_samples, args.eval_split: args.max_eval_samples}
    remap = {label: i for i, label in enumerate(args.classes)}
    out = {}
    for split, limit in limits.items():
        if split not in splits:
            raise StudyArgumentsError(f"Dataset {args.dataset!r} has no {split!r} split (it has {list(splits)}).")
        data: Dataset = splits[split]
        missing = {args.image_column, args.label_column} - set(data.column_names)
        if missing:
            raise StudyArgumentsError(
                f"Dataset {args.dataset!r} split {split!r} lacks columns {sorted(missing)}; name them with "
                f"image_column / label_column (--image_column / --label_column; columns: {data.column_names})."
            )
        data = data.filter(lambda row: row[args.label_column] in remap)
        if limit is not None:
            data = data.select(range(min(limit, len(data))))
        if len(data) == 0:
            raise StudyArgumentsError(f"No {split} example of {args.dataset!r} has a label in {args.classes}.")

        def encode(batch):
            grey = np.stack([np.asarray(img.convert("L"), dtype=np.float32) for img in batch[args.image_column]])
            pixels = (grey / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
            return {"pixel_values": pixels[:, None], "labels": [remap[y] for y in batch[args.label_column]]}

        data = data.map(encode, batched=True, remove_columns=data.column_names, desc=f"encoding {split}")
        out["train" if split == "train" else "eval"] = data
    return DatasetDict(out)


def build_image_model(args: ImageModelArguments, num_labels: int) -> PreTrainedModel:
    """A ViT from ``model_name_or_path`` (with a fresh head if asked) or from random initialisation."""
    if args.model_name_or_path:
        model = load_named(AutoModelForImageClassification, args.model_name_or_path, num_labels=num_labels,
                           ignore_mismatched_sizes=True)
        if args.fresh_head:
            head = model.classifier if hasattr(model, "classifier") else model.timm_model.get_classifier()
            with torch.no_grad():
                head.weight.normal_(0.0, 0.02)
                head.bias.zero_()
        return model
    if args.model_type == ImageModelType.VIT:
        return ViTForImageClassification(ViTConfig(
            image_size=args.image_size, patch_size=args.patch_size, num_channels=1, hidden_size=args.hidden_size,
            num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
            intermediate_size=args.intermediate_size, num_labels=num_labels,
        ))
    config = TimmWrapperConfig(
        architecture=args.timm_architecture, num_labels=num_labels,
        model_args={"img_size": args.image_size, "patch_size": args.patch_size, "in_chans": 1,
                    "embed_dim": args.hidden_size, "depth": args.num_hidden_layers,
                    "num_heads": args.num_attention_heads, "mlp_ratio": args.intermediate_size / args.hidden_size},
    )
    return TimmWrapperForImageClassification(config)


def build_image_classification_trainer(
    model_args: ImageModelArguments,
    data_args: ImageDataArguments,
    stability: StabilityArguments,
    training: TrainingArguments,
) -> StabilityTrainer:
    """Encode the images and return a StabilityTrainer whose model_init the Trainer seeds with
    ``training.seed``."""
    splits = load_image_splits(data_args)
    num_labels = len(data_args.classes)
    # the report card's metadata names Hub ids only, never local folders
    name = model_args.model_name_or_path
    if name and not Path(name).exists() and not stability.base_model:
        stability = replace(stability, base_model=name)
    if not stability.dataset_name:
        hub_name = FASHION_MNIST_HUB_ID if data_args.dataset == "fashion_mnist" else data_args.dataset
        if not Path(hub_name).exists():
            stability = replace(stability, dataset_name=hub_name)

    def model_init() -> PreTrainedModel:
        # seeded by the Trainer (training.seed), or under another seed for an init-seed child
        return build_image_model(model_args, num_labels)

    return StabilityTrainer(
        model_init=model_init,
        args=training,
        train_dataset=splits["train"],
        eval_dataset=splits["eval"],
        data_collator=default_data_collator,
        compute_metrics=classification_metrics("accuracy"),
        stability_args=stability,
    )
