"""Small real models and data for the tests: a tiny random BERT and slices of the real tweets."""

from __future__ import annotations

from functools import cache

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from hf_stability import StabilityArguments, StabilityTrainer
from hf_stability.data import load_tokenizer, load_tweet_sentiment
from hf_stability.metrics import classification_metrics


def tiny_bert_config(**overrides) -> BertConfig:
    values = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    values.update(overrides)
    return BertConfig(**values)


def tiny_bert(seed: int = 0, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(**overrides))


@cache
def _tokenized_tweets(n_train: int, n_eval: int, max_length: int) -> tuple[Dataset, Dataset]:
    tokenizer = load_tokenizer()
    splits = load_tweet_sentiment()
    train = splits["train"].select(range(n_train))
    test = splits["test"].select(range(n_eval))

    def encode(batch):
        return tokenizer(batch["text"], truncation=True, padding="max_length", max_length=max_length)

    train = train.map(encode, batched=True, remove_columns=["text"])
    test = test.map(encode, batched=True, remove_columns=["text"])
    return train, test


def tweets(n_train: int = 128, n_eval: int = 64, max_length: int = 32) -> tuple[Dataset, Dataset]:
    return _tokenized_tweets(n_train, n_eval, max_length)


def training_args(output_dir, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(output_dir),
        max_steps=12,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=32,
        learning_rate=1e-3,
        warmup_steps=2,
        seed=7,
        report_to="none",
        save_strategy="no",
        logging_steps=4,
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def peft_bert(adapter: str = "lora", seed: int = 0):
    """The tiny BERT with a PEFT adapter ("lora": rank 4 on query and value; "ia3": peft's default
    modules); the new classifier trains too (modules_to_save)."""
    from peft import IA3Config, LoraConfig, get_peft_model

    config = (LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
              if adapter == "lora" else IA3Config(task_type="SEQ_CLS"))
    return get_peft_model(tiny_bert(seed), config)


def tiny_trainer(out, stability: StabilityArguments | None = None, model_init=None, **overrides) -> StabilityTrainer:
    """A StabilityTrainer of the tiny BERT (or ``model_init``'s model) on the real tweets;
    ``overrides`` go to training_args."""
    train, test = tweets()
    return StabilityTrainer(
        model_init=model_init or (lambda: tiny_bert(0)),
        args=training_args(out, **overrides),
        train_dataset=train,
        eval_dataset=test,
        compute_metrics=classification_metrics(),
        stability_args=stability or StabilityArguments(spawn_steps=[0, 5], num_children=2, divergence_every=4),
    )


def model_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a torch.distributed rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the shared analysed study --------------------------------------------------------------------
#: The tiny study every test of a finished run reads (tests/conftest.py: ``analysed_study``): the
#: tiny BERT on real tweets, spawn steps 0 and 4 of 8, two perturbed children and a control each.
STUDY = dict(spawn_steps=[0, 4], num_children=2, perturbation_scale=0.5, divergence_every=2,
             base_model="google-bert/bert-base-uncased", dataset_name="cardiffnlp/tweet_eval")
STUDY_TRAINING = dict(max_steps=8, learning_rate=3e-3, save_strategy="steps", save_steps=4)


def study_trainer(out, **stability_overrides) -> StabilityTrainer:
    """The shared study's trainer on ``out`` (run it to train, resume or rebuild a run there)."""
    return tiny_trainer(out, StabilityArguments(**{**STUDY, **stability_overrides}), **STUDY_TRAINING)


def study_analysis(**overrides):
    """The arguments the shared study was analysed with (the same again reuse its report)."""
    from hf_stability.analysis import AnalyzeArguments

    return AnalyzeArguments(**{**dict(train_samples=32, batch_size=16, alphas=3, cpu=True), **overrides})


def copy_run(run, tmp_path):
    """A copy of a run directory that a test may change."""
    import shutil

    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target
