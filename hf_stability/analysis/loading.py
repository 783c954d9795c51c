"""Read what the analyzer needs from a run directory: final models and the saved data.

A run directory may come from anywhere (downloaded from the Hub, shared by a colleague), so
nothing in it is executed: models load with ``trust_remote_code=False`` through a concrete
transformers class (never an Auto class, never code shipped beside the weights), weights from
safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import AnalysisDataError, MissingDataError, RunDirectoryError
from ..run_directory import ADAPTER_CONFIG_NAME, CONFIG_JSON, WEIGHTS_NAME, RunDirectory


def model_class_of(final_dir: str | Path) -> type:
    """The concrete ``transformers`` model class named in ``final_dir/config.json``.

    Raises:
        RunDirectoryError: config.json is missing or unreadable, or names no concrete
            transformers class (an Auto class, a class of custom code, nothing).
    """
    import transformers
    from transformers import PreTrainedModel

    config_file = Path(final_dir) / CONFIG_JSON
    if not config_file.is_file():
        raise RunDirectoryError(
            f"{final_dir} has no config.json, so its model cannot be rebuilt with from_pretrained. A model saved "
            "without one is not a transformers PreTrainedModel; analyse it with the Python API "
            "(hf_stability.analysis.analyze_run(..., model_class=YourModelClass))."
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirectoryError(f"{config_file} is not valid JSON ({err}): the file is damaged.") from None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    name = architectures[0] if isinstance(architectures, list) and architectures else None
    found = getattr(transformers, name, None) if isinstance(name, str) else None
    concrete = isinstance(found, type) and issubclass(found, PreTrainedModel) and not found.__name__.startswith("Auto")
    if not concrete:
        custom = " and an auto_map (model code shipped beside the weights)" if config.get("auto_map") else ""
        raise RunDirectoryError(
            f"{config_file} names the architecture {name!r}{custom}, which is no concrete transformers model class. "
            "hf_stability never runs code found in a run directory. If this is your own model class, pass it: "
            "hf_stability.analysis.analyze_run(..., model_class=YourModelClass)."
        )
    return found


def load_final_model(final_dir: str | Path, model_class: type | None = None) -> nn.Module:
    """A run's ``final/`` model through ``from_pretrained`` of ``model_class`` (default: the
    concrete transformers class its config.json names), with ``trust_remote_code=False`` and
    weights from safetensors only.

    Raises:
        RunDirectoryError: the folder lacks its files, names no loadable class, or its weights
            are truncated or corrupt.
    """
    from safetensors import SafetensorError

    final_dir = Path(final_dir)
    weights = final_dir / WEIGHTS_NAME
    model_class = model_class or model_class_of(final_dir)
    if not weights.is_file():
        raise RunDirectoryError(
            f"{final_dir} has no model.safetensors. The run is incomplete: delete that final/ folder and re-run the "
            "study to train it again."
        )
    try:
        return model_class.from_pretrained(str(final_dir), use_safetensors=True, trust_remote_code=False)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise RunDirectoryError(
            f"Cannot load {weights}: the file is truncated or corrupt ({type(err).__name__}: {str(err)[:200]}). "
            "Delete that final/ folder and re-run the study to train it again."
        ) from None


def load_run_model(run: RunDirectory, final_dir: Path, model_class: type | None = None) -> nn.Module:
    """A final/ of ``run``: the model itself, or for a PEFT study its adapter on the study's base
    model (RUN/base_model), as a ``peft.PeftModel``.

    Raises:
        RunDirectoryError: files are missing or damaged (see load_final_model).
        MissingDataError: a PEFT study, and peft is not installed.
    """
    if not (final_dir / ADAPTER_CONFIG_NAME).is_file():
        return load_final_model(final_dir, model_class)
    try:
        from peft import PeftModel
    except ImportError:
        raise MissingDataError(f"{final_dir} holds a PEFT adapter: install peft (pip install 'hf_stability[peft]') "
                               "to analyse it.") from None
    if not run.base_model_dir.is_dir():
        raise RunDirectoryError(f"{final_dir} holds a PEFT adapter, and {run.base_model_dir} (its base model) is "
                                f"missing. {run.base_model_remedy()}", path=run.base_model_dir)
    base = load_final_model(run.base_model_dir, model_class)
    try:
        return PeftModel.from_pretrained(base, str(final_dir), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise RunDirectoryError(f"Cannot load the adapter in {final_dir} ({type(err).__name__}: {str(err)[:200]}): "
                                "it is damaged or of another base model.", path=final_dir) from None


def load_run_data(run: RunDirectory, split: str) -> Any:
    """The model inputs the study saved for the analyzer (``RUN/data/<split>``)."""
    from ..run_files import load_saved_dataset

    path = run.data_split(split)
    if not path.is_dir():
        raise AnalysisDataError(
            f"{path} is missing: this run saved no {split} data (no eval_dataset, or not a datasets.Dataset). "
            "Pass the data to hf_stability.analysis.analyze_run(..., eval_data=..., train_data=...) instead."
        )
    return load_saved_dataset(path, run.data_remedy())


def run_collator(run: RunDirectory) -> Any:
    """The collator the study used (RUN/data/collator.json, see ``collator_record``), with the
    tokenizer it saved (RUN/data/tokenizer, or for runs of earlier versions the parent's final/),
    or transformers' default."""
    from transformers import (
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        DataCollatorForSeq2Seq,
        DataCollatorWithPadding,
        default_data_collator,
    )

    from ..run_files import read_json

    info = run.collator_file
    record = read_json(info, run.data_remedy()) if info.is_file() else {"collator": "default"}
    kind, multiple = record.get("collator"), record.get("pad_to_multiple_of")
    if kind == "trl_sft":  # TRL's SFT collator, rebuilt from its arguments (the study ran with trl installed)
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling as SFTCollator

        return SFTCollator(pad_token_id=record["pad_token_id"], padding_free=record["padding_free"],
                           return_position_ids=record["return_position_ids"], pad_to_multiple_of=multiple)
    builders = {
        "padding": lambda tokenizer: DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple),
        "causal_lm": lambda tokenizer: DataCollatorForLanguageModeling(tokenizer, mlm=False,
                                                                       pad_to_multiple_of=multiple),
        "seq2seq": lambda tokenizer: DataCollatorForSeq2Seq(
            tokenizer, pad_to_multiple_of=multiple, label_pad_token_id=record.get("label_pad_token_id", -100)),
    }
    if kind not in builders:
        return default_data_collator
    folder = run.data_tokenizer if run.data_tokenizer.is_dir() else run.parent_final
    problem = None
    # (from a folder with a config.json alone, AutoTokenizer builds a tokenizer with an empty vocabulary)
    if not any((folder / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
        problem = "no tokenizer_config.json or tokenizer.json"
    else:
        try:
            return builders[kind](AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False))
        except (OSError, ValueError) as err:
            problem = str(err).splitlines()[0][:200]
    raise RunDirectoryError(
        f"The run pads its batches, but {folder} holds no tokenizer to pad with ({problem}). Pass the collator "
        "yourself: hf_stability.analysis.analyze_run(..., collate_fn=DataCollatorWithPadding(your_tokenizer))."
    )
