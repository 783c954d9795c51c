"""The analysis data a study saves in RUN/data: the model inputs of a training subset and of the
evaluation set, how to batch them, and the tokenizer that pads them, so that a run is analysed
on any machine without the code that built its data."""

from __future__ import annotations

import logging
from typing import Any

from ..atomic_io import atomic_directory, write_json
from ..manifest import named_files, write_manifest
from ..run_directory import MANIFEST_NAME, RunDirectory

logger = logging.getLogger(__name__)


def save_base_model(trainer: Any, run: RunDirectory, run_fingerprint: str) -> None:
    """For a PEFT model: its base model, saved once in RUN/base_model (every checkpoint and final/
    of the study holds only an adapter; the analyzer puts each on this base). It costs one copy
    of the base on disk, and one in memory while it is saved."""
    import copy

    from ..adapters import is_peft_model

    model = trainer.model
    if not is_peft_model(model) or run.base_model_dir.is_dir():
        return
    base = copy.deepcopy(model).unload()  # the base's own weights: the adapter layers removed, not merged
    with atomic_directory(run.base_model_dir) as tmp:
        base.save_pretrained(str(tmp), safe_serialization=True)
        write_manifest(tmp / MANIFEST_NAME, named_files(tmp, ""), run_fingerprint)
    del base


def collator_record(collator: Any) -> dict[str, Any]:
    """What the analyzer needs to batch the saved examples as training did: ``padding``
    (DataCollatorWithPadding), ``causal_lm`` (DataCollatorForLanguageModeling with mlm=False:
    labels are the input ids, padding labelled -100), ``seq2seq`` (DataCollatorForSeq2Seq: the
    dataset's own labels, completion-only ones too, padded with -100), ``trl_sft`` (TRL's
    SFTTrainer collator: its own padding, completion masks and padding-free batches, rebuilt from
    its arguments), else ``default`` (transformers' default_data_collator: examples of one length)."""
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, DataCollatorWithPadding

    multiple = getattr(collator, "pad_to_multiple_of", None)
    if type(collator).__module__.startswith("trl.") and type(collator).__name__ == "DataCollatorForLanguageModeling":
        return {"collator": "trl_sft", "pad_to_multiple_of": multiple, "pad_token_id": collator.pad_token_id,
                "padding_free": collator.padding_free, "return_position_ids": collator.return_position_ids}
    if isinstance(collator, DataCollatorWithPadding):
        return {"collator": "padding", "pad_to_multiple_of": multiple}
    if isinstance(collator, DataCollatorForLanguageModeling) and not collator.mlm:
        return {"collator": "causal_lm", "pad_to_multiple_of": multiple}
    if isinstance(collator, DataCollatorForSeq2Seq) and collator.model is None:
        return {"collator": "seq2seq", "pad_to_multiple_of": multiple,
                "label_pad_token_id": collator.label_pad_token_id}
    return {"collator": "default"}


def save_analysis_data(trainer: Any, run: RunDirectory, run_fingerprint: str) -> None:
    """Save what is missing of RUN/data, then (once complete) its manifest of checksums."""
    import datasets

    stability = trainer.stability_args
    wanted = {"train": (trainer.train_dataset, stability.analysis_train_samples),
              "eval": (trainer.eval_dataset, stability.analysis_eval_samples)}
    for split, (dataset, limit) in wanted.items():
        target = run.data_split(split)
        if target.is_dir() or dataset is None:
            continue
        if not isinstance(dataset, datasets.Dataset):
            logger.info("The %s dataset is not a datasets.Dataset: pass data to the analyzer yourself.", split)
            continue
        dataset = trainer._remove_unused_columns(dataset, description=split)
        count = len(dataset) if limit is None else min(limit, len(dataset))
        subset = dataset.select(range(count))
        if subset.format.get("type") == "custom":  # an on-the-fly transform: store what it returns
            subset = datasets.Dataset.from_list([subset[i] for i in range(count)])
        with atomic_directory(target) as tmp:
            subset.save_to_disk(str(tmp))
    collator = collator_record(trainer.data_collator)
    needs_tokenizer = collator["collator"] not in ("default", "trl_sft")  # TRL's pads with its pad_token_id
    if needs_tokenizer and not run.data_tokenizer.is_dir():  # what the analyzer pads with
        with atomic_directory(run.data_tokenizer) as tmp:
            trainer.data_collator.tokenizer.save_pretrained(str(tmp))
    if not run.collator_file.is_file():
        write_json(run.collator_file, collator)
    if not run.data_manifest.is_file():  # the data is complete: record its checksums
        write_manifest(run.data_manifest, named_files(run.data_dir, ""), run_fingerprint)
