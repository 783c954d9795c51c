"""Ready-made studies: build a StabilityTrainer for a task from argument dataclasses."""

from .image_classification import (
    ImageClassificationArguments,
    ImageDataArguments,
    ImageModelArguments,
    build_image_classification_trainer,
    build_image_model,
    load_image_splits,
)
from .text_classification import (
    TextClassificationArguments,
    TextDataArguments,
    TextModelArguments,
    build_text_classification_trainer,
    load_text_splits,
)

__all__ = [
    "ImageClassificationArguments",
    "ImageDataArguments",
    "ImageModelArguments",
    "TextClassificationArguments",
    "TextDataArguments",
    "TextModelArguments",
    "build_image_classification_trainer",
    "build_image_model",
    "build_text_classification_trainer",
    "load_image_splits",
    "load_text_splits",
]
