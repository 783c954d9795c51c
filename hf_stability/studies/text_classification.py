"""Text classification study: a BERT-family model fine-tuned on a labelled text dataset.

``build_text_classification_trainer(model_args, data_args, stability_args, training_args, adapter_args)``
takes its argument dataclasses separately, as run_glue does (``adapter_args``: an optional PEFT
adapter, studies/adapters.py); the CLI's ``train`` command
and recipes/butterfly_text_classification.py parse them with one HfArgumentParser.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from datasets import Dataset, DatasetDict
from transformers import AutoConfig, AutoModelForSequenceClassification, DataCollatorWithPadding, TrainingArguments

from ..data import load_drug_reviews, load_tokenizer, load_tweet_sentiment, resolve_model
from ..data.hub import load_named, load_named_dataset
from ..errors import StudyArgumentsError
from ..metrics import classification_metrics
from ..training import StabilityArguments, StabilityTrainer
from .adapters import AdapterArguments

OFFLINE_DATASETS = {"tweets": load_tweet_sentiment, "drug_reviews": load_drug_reviews}
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class TextModelArguments:
    """Which model a text classification study fine-tunes."""

    model_name_or_path: str = field(
        default="minilm",
        metadata={"help": "'minilm' (the packaged all-MiniLM-L6-v2), a local folder, or a Hub model name."},
    )
    random_init: bool = field(
        default=False,
        metadata={"help": "Train model_name_or_path's architecture from random initialisation instead of its "
                  "pretrained weights (the paper's contrast: random starts are far less stable)."},
    )


@dataclass
class TextDataArguments:
    """Which texts a text classification study uses."""

    dataset: str = field(
        default="tweets",
        metadata={"help": "'tweets', 'drug_reviews' (both offline), or a Hub dataset with text and label columns."},
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    label_column: str = field(default="label", metadata={"help": "Column holding the integer label."})
    eval_split: str = field(default="test", metadata={"help": "Split used for evaluation."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation examples."})
    max_length: int = field(default=64, metadata={"help": "Truncate texts to this many tokens."})

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise StudyArgumentsError(f"max_length must be >= 8 tokens, got {self.max_length}.")


def _card_metadata(model_args: TextModelArguments, data_args: TextDataArguments,
                   stability: StabilityArguments) -> StabilityArguments:
    """Fill the report card's base_model / dataset_name from Hub names (never from local paths)."""
    model = model_args.model_name_or_path
    # a model trained from random initialisation has no base model, whatever was passed
    base_model = None if model_args.random_init else stability.base_model or (
        MINILM_HUB_ID if model in ("", "minilm") else None if Path(model).exists() else model
    )
    return replace(stability, base_model=base_model, dataset_name=hub_dataset_name(data_args, stability))


def hub_dataset_name(data_args: TextDataArguments, stability: StabilityArguments) -> str | None:
    """The report card's dataset_name: the one given, else the dataset when it is a Hub name
    (None for the offline sets and local folders)."""
    dataset = data_args.dataset
    return stability.dataset_name or (None if dataset in OFFLINE_DATASETS or Path(dataset).exists() else dataset)


def load_text_splits(args: TextDataArguments) -> DatasetDict:
    loader = OFFLINE_DATASETS.get(args.dataset)
    # a Hub name or a local folder
    splits = loader() if loader is not None else load_named_dataset(args.dataset, tuple(OFFLINE_DATASETS))
    for split in ("train", args.eval_split):
        if split not in splits:
            raise StudyArgumentsError(f"Dataset {args.dataset!r} has no {split!r} split (it has {list(splits)}).")
        missing = {args.text_column, args.label_column} - set(splits[split].column_names)
        if missing:
            raise StudyArgumentsError(
                f"Dataset {args.dataset!r} split {split!r} lacks columns {sorted(missing)}; name them with "
                f"text_column / label_column (--text_column / --label_column; columns: {splits[split].column_names})."
            )
    return splits


def load_train_and_eval(args: TextDataArguments) -> tuple[Dataset, Dataset]:
    """The train and eval splits of ``args.dataset`` (load_text_splits), cut to
    max_train_samples / max_eval_samples."""
    splits = load_text_splits(args)
    train, evaluation = splits["train"], splits[args.eval_split]
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(args.max_eval_samples, len(evaluation))))
    return train, evaluation


def build_text_classification_trainer(
    model_args: TextModelArguments,
    data_args: TextDataArguments,
    stability: StabilityArguments,
    training: TrainingArguments,
    adapter: AdapterArguments | None = None,
) -> StabilityTrainer:
    """Tokenise the data and return a StabilityTrainer whose model_init seeds the new classifier head
    (with ``adapter``: and puts a PEFT adapter on the model)."""
    adapter = adapter or AdapterArguments()
    train, evaluation = load_train_and_eval(data_args)
    label_feature = train.features[data_args.label_column]
    label_names = getattr(label_feature, "names", None)
    to_id = None
    if label_names is None and getattr(label_feature, "dtype", None) == "string":
        # string labels (as run_glue does): class ids in sorted order of the training set's names
        label_names = sorted(set(train[data_args.label_column]))
        to_id = {name: i for i, name in enumerate(label_names)}
        unknown = sorted(set(evaluation[data_args.label_column]) - set(to_id))
        if unknown:
            raise StudyArgumentsError(
                f"The {data_args.eval_split} split has labels the training split lacks: {unknown[:5]}. Use splits "
                "with the "
                "same label names."
            )
    num_labels = len(label_names) if label_names else len(set(train[data_args.label_column]))

    model_path = resolve_model(model_args.model_name_or_path)
    tokenizer = load_tokenizer(model_path)

    def encode(batch):
        encoded = tokenizer(batch[data_args.text_column], truncation=True, max_length=data_args.max_length)
        labels = batch[data_args.label_column]
        encoded["labels"] = [to_id[y] for y in labels] if to_id is not None else labels
        return encoded

    columns = train.column_names
    train = train.map(encode, batched=True, remove_columns=columns, desc="tokenising train")
    evaluation = evaluation.map(encode, batched=True, remove_columns=evaluation.column_names, desc="tokenising eval")

    names = {"id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}} \
        if label_names else {}

    def model_init():
        # The Trainer seeds the global RNG (training.seed) before it calls model_init; an init-seed
        # reference child calls it under another seed, so it must not seed the RNG itself.
        if model_args.random_init:
            config = load_named(AutoConfig, model_path, num_labels=num_labels, **names)
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = load_named(AutoModelForSequenceClassification, model_path, num_labels=num_labels, **names)
        return adapter.wrap(model, "SEQ_CLS")

    return StabilityTrainer(
        model_init=model_init,
        args=training,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=classification_metrics("accuracy"),
        stability_args=_card_metadata(model_args, data_args, stability),
    )
