"""Offline Fashion-MNIST from the Debian package ``dataset-fashion-mnist``.

The package ships the original gzip IDX files, a format ``load_dataset`` has no builder for:
they are parsed with numpy into a ``datasets.Dataset`` with an Image and a ClassLabel column.
Online users can pass ``dataset_name="zalando-datasets/fashion_mnist"`` instead.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset

from ..errors import MissingDataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise MissingDataError(f"{path} is not an unsigned-byte IDX file; reinstall dataset-fashion-mnist.")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_dir() -> Path:
    folder = Path(os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    if not all((folder / name).is_file() for pair in _FILES.values() for name in pair):
        raise MissingDataError(
            f"Fashion-MNIST was not found in {folder}. Install the Debian package with:\n"
            "    apt-get update && apt-get install -y dataset-fashion-mnist\n"
            "or set FASHION_MNIST_DIR to a folder holding the four IDX .gz files."
        )
    return folder


def load_fashion_mnist(
    classes: list[int] | None = None, max_per_split: int | None = None, dataset_name: str | None = None
) -> DatasetDict:
    """Fashion-MNIST as ``image`` (28x28 grey PIL image) and ``label``; ``classes`` keeps only those
    classes (labels keep their original ids), ``max_per_split`` keeps the first examples."""
    if dataset_name:
        return load_dataset(dataset_name)
    folder = fashion_mnist_dir()
    features = Features({"image": Image(), "label": ClassLabel(names=FASHION_MNIST_LABELS)})
    out = {}
    for split, (images_name, labels_name) in _FILES.items():
        images = _read_idx(folder / images_name)
        labels = _read_idx(folder / labels_name).astype(np.int64)
        keep = np.arange(len(labels)) if classes is None else np.flatnonzero(np.isin(labels, classes))
        if max_per_split is not None:
            keep = keep[:max_per_split]
        out[split] = Dataset.from_dict(
            {"image": [img for img in images[keep]], "label": labels[keep].tolist()}, features=features
        )
    return DatasetDict(out)
