"""Read what the analyzer needs from a run directory: final models and the saved data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import AnalysisDataError, RunDirectoryError
from ..run_directory import RunDirectory


def load_final_model(final_dir: str | Path) -> nn.Module:
    """A run's ``final/`` model through ``from_pretrained`` (its class from config.json), weights
    from safetensors only."""
    import transformers
    from safetensors import SafetensorError

    final_dir = Path(final_dir)
    config_file, weights = final_dir / "config.json", final_dir / "model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        missing = "config.json" if not config_file.is_file() else "model.safetensors"
        raise RunDirectoryError(
            f"{final_dir} has no {missing}. The run is incomplete: delete that final/ folder and re-run the study "
            "to train it again."
        )
    try:
        architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
    except json.JSONDecodeError as err:
        raise RunDirectoryError(f"{config_file} is not valid JSON ({err}).") from None
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise RunDirectoryError(f"{config_file} names no transformers architecture ({architectures}).")
    try:
        return model_class.from_pretrained(str(final_dir), use_safetensors=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise RunDirectoryError(
            f"Cannot load {weights}: the file is truncated or corrupt ({type(err).__name__}: {str(err)[:200]}). "
            "Delete that final/ folder and re-run the study to train it again."
        ) from None


def load_run_data(run: RunDirectory, split: str) -> Any:
    """The model inputs the study saved for the analyzer (``RUN/data/<split>``)."""
    from datasets import load_from_disk

    path = run.data_dir / split
    if not path.is_dir():
        raise AnalysisDataError(
            f"{path} is missing: this run saved no {split} data (no eval_dataset, or not a datasets.Dataset). "
            "Pass the data to hf_stability.analysis.analyze_run(..., eval_data=..., train_data=...) instead."
        )
    return load_from_disk(str(path))


def run_collator(run: RunDirectory) -> Any:
    """The collator the study used: padding with the saved tokenizer, or transformers' default."""
    from transformers import AutoTokenizer, DataCollatorWithPadding, default_data_collator

    info = run.data_dir / "collator.json"
    kind = json.loads(info.read_text(encoding="utf-8"))["collator"] if info.is_file() else "default"
    if kind == "padding":
        return DataCollatorWithPadding(AutoTokenizer.from_pretrained(str(run.parent_final)))
    return default_data_collator
