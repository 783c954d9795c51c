"""Pretraining a small Llama-shaped decoder on the packaged text, so that a causal language model
study has a pretrained model to fine-tune offline (no pretrained decoder is packaged).

``DecoderArguments`` is its shape (tens of millions of parameters by default) and its tokenizer
(default: the packaged MiniLM's WordPiece tokenizer, whose [CLS] and [SEP] begin and end each
text); ``CorpusArguments`` the texts (the tweets' and the drug reviews' train splits: their
labels are not used). A plain Trainer run (recipes/pretrain_causal_lm.py), saved with
save_pretrained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset, concatenate_datasets
from transformers import DataCollatorForLanguageModeling, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from ..data import load_tokenizer
from ..errors import StudyArgumentsError
from .causal_lm import boundary_tokens, ready_tokenizer
from .text_classification import OFFLINE_DATASETS


@dataclass
class DecoderArguments:
    """The shape of the Llama-shaped decoder to pretrain, and its tokenizer."""

    tokenizer_name_or_path: str = field(
        default="minilm",
        metadata={"help": "'minilm' (the packaged MiniLM's tokenizer), a local folder or a Hub name."})
    hidden_size: int = field(default=512, metadata={"help": "Width of the residual stream."})
    num_hidden_layers: int = field(default=8, metadata={"help": "Decoder layers."})
    num_attention_heads: int = field(default=8, metadata={"help": "Query heads."})
    num_key_value_heads: int = field(default=4, metadata={"help": "Key/value heads (grouped-query attention)."})
    intermediate_size: int = field(default=1376, metadata={"help": "Width of the gated MLP."})
    max_position_embeddings: int = field(default=256, metadata={"help": "Longest sequence (rotary positions)."})

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise StudyArgumentsError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                                      f"({self.num_attention_heads}).")
        if self.num_attention_heads % self.num_key_value_heads:
            raise StudyArgumentsError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                                      f"num_key_value_heads ({self.num_key_value_heads}).")


@dataclass
class CorpusArguments:
    """The texts a decoder is pretrained on."""

    corpora: list[str] = field(default_factory=lambda: ["tweets", "drug_reviews"],
                               metadata={"help": "Offline text sets whose train texts are used: tweets, drug_reviews."})
    max_length: int = field(default=64, metadata={"help": "Cut each text to this many tokens."})
    eval_fraction: float = field(default=0.02, metadata={"help": "Share of the texts held out for evaluation."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training texts."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation texts."})

    def __post_init__(self) -> None:
        unknown = sorted(set(self.corpora) - set(OFFLINE_DATASETS))
        if unknown or not self.corpora:
            raise StudyArgumentsError(f"corpora must name some of {sorted(OFFLINE_DATASETS)}, got {self.corpora}.")
        if self.max_length < 8:
            raise StudyArgumentsError(f"max_length must be >= 8 tokens, got {self.max_length}.")
        if not 0.0 < self.eval_fraction < 1.0:
            raise StudyArgumentsError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}.")


def build_decoder(args: DecoderArguments, tokenizer: Any) -> LlamaForCausalLM:
    """A randomly initialised LlamaForCausalLM of ``args``' shape over ``tokenizer``'s vocabulary."""
    begin, end = boundary_tokens(tokenizer)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
        intermediate_size=args.intermediate_size, max_position_embeddings=args.max_position_embeddings,
        bos_token_id=begin, eos_token_id=end, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def load_corpus(args: CorpusArguments, tokenizer: Any, seed: int) -> tuple[Dataset, Dataset]:
    """Every train text of ``args.corpora``, tokenised as [begin] text [end], split train/eval."""
    texts = concatenate_datasets([OFFLINE_DATASETS[name]()["train"].select_columns(["text"]) for name in args.corpora])
    begin, end = boundary_tokens(tokenizer)
    head = [] if begin is None else [begin]

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        ids = [head + row[: args.max_length - len(head) - 1] + [end] for row in ids]
        return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}

    encoded = texts.map(encode, batched=True, remove_columns=["text"], desc="tokenising the corpus")
    splits = encoded.train_test_split(test_size=args.eval_fraction, seed=seed)
    train, evaluation = splits["train"], splits["test"]
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(args.max_eval_samples, len(evaluation))))
    return train, evaluation


def build_pretraining_trainer(model_args: DecoderArguments, corpus: CorpusArguments,
                              training: TrainingArguments) -> Trainer:
    """A plain Trainer that pretrains a new decoder on the corpus (next-token loss, padding -100);
    ``trainer.save_model()`` then saves the model and its tokenizer."""
    from transformers import set_seed

    tokenizer = ready_tokenizer(load_tokenizer(model_args.tokenizer_name_or_path))
    train, evaluation = load_corpus(corpus, tokenizer, training.seed)
    set_seed(training.seed)
    model = build_decoder(model_args, tokenizer)
    return Trainer(model=model, args=training, train_dataset=train, eval_dataset=evaluation,
                   processing_class=tokenizer, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
