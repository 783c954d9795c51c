"""Ready-made studies: build a StabilityTrainer for a task from argument dataclasses."""

from .text_classification import TextClassificationArguments, build_text_classification_trainer, load_text_splits

__all__ = ["TextClassificationArguments", "build_text_classification_trainer", "load_text_splits"]
