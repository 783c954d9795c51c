"""A dataset or model the user names: a local folder or a Hub name, through the real
``load_dataset`` / ``from_pretrained``, with one clear error when it resolves to neither."""

from __future__ import annotations

from typing import Any

from ..errors import MissingDataError


def load_named_dataset(name: str, offline_names: tuple[str, ...] = ()) -> Any:
    """``datasets.load_dataset(name)``.

    Raises:
        MissingDataError: ``name`` is no local dataset and cannot be loaded from the Hub.
    """
    from datasets import load_dataset

    try:
        return load_dataset(name)
    except (FileNotFoundError, ConnectionError, ValueError, OSError) as err:
        offline = f"; {' and '.join(offline_names)} work offline" if offline_names else ""
        raise MissingDataError(
            f"Cannot load the dataset {name!r}: it is no local folder and the Hub cannot give it "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). Pass a local dataset folder, or a Hub dataset "
            f"name while online{offline}."
        ) from None


def load_named(loader: Any, name: str, what: str = "model", **kwargs: Any) -> Any:
    """``loader.from_pretrained(name, **kwargs)`` (an Auto class, a tokenizer class...).

    Raises:
        MissingDataError: ``name`` is no local folder and cannot be loaded from the Hub.
    """
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise MissingDataError(
            f"Cannot load the {what} {name!r}: it is no local folder of a saved {what} and the Hub cannot give it "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). Pass the folder of a save_pretrained {what}, "
            "'minilm' (the packaged all-MiniLM-L6-v2), or a Hub name while online."
        ) from None
