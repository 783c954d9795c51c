"""Offline data and models for demos, recipes and tests (real from_pretrained / load_dataset
calls on local paths; pass a Hub name instead when online)."""

from .images import FASHION_MNIST_LABELS, load_fashion_mnist
from .models import load_sequence_classifier, load_tokenizer, minilm_path, resolve_model
from .text import SENTIMENT_LABELS, load_drug_reviews, load_tweet_sentiment

__all__ = [
    "FASHION_MNIST_LABELS",
    "SENTIMENT_LABELS",
    "load_drug_reviews",
    "load_fashion_mnist",
    "load_sequence_classifier",
    "load_tokenizer",
    "load_tweet_sentiment",
    "minilm_path",
    "resolve_model",
]
