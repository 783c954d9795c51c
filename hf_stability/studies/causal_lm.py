"""Causal language model study: a decoder (GPT-2, the Llama family...) fine-tuned, fully or with
a LoRA adapter, on a labelled text dataset cast as instruction-style completions.

Each example is ``prompt_template`` filled with the text, then ``answer_template`` filled with
the label's name, then the end-of-sequence token: "Tweet: ... Sentiment:" -> " positive". With
``completion_only`` (the default, as TRL's SFT does) the prompt's tokens are labelled -100, so the
loss, the loss barrier, the perplexity and the next-token error count the answer alone.
``build_causal_lm_trainer`` takes its argument dataclasses separately, as the text study does;
recipes/butterfly_causal_lm.py parses them with one HfArgumentParser.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, TrainingArguments

from ..data import load_tokenizer
from ..data.hub import load_named
from ..errors import StudyArgumentsError
from ..training import StabilityArguments, StabilityTrainer
from .adapters import AdapterArguments
from .text_classification import TextDataArguments, hub_dataset_name, load_train_and_eval

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class CausalModelArguments:
    """Which decoder a causal language model study fine-tunes."""

    model_name_or_path: str = field(
        default="",
        metadata={"help": "A local folder (recipes/pretrain_causal_lm.py saves one) or a Hub name of a model "
                  "AutoModelForCausalLM loads, with its tokenizer."},
    )
    model_dtype: str = field(
        default="float32",
        metadata={"help": "dtype the weights are loaded in: float32, or bfloat16 / float16 (the usual choice for "
                  "a LoRA adapter on a large base; the adapter itself stays float32)."},
    )

    def __post_init__(self) -> None:
        if not self.model_name_or_path:
            raise StudyArgumentsError(
                "A causal language model study needs model_name_or_path: no pretrained decoder is packaged, so "
                "pretrain one with recipes/pretrain_causal_lm.py and pass its --output_dir, or name a Hub model.")
        if self.model_dtype not in DTYPES:
            raise StudyArgumentsError(f"model_dtype must be one of {', '.join(DTYPES)}, got {self.model_dtype!r}.")


@dataclass
class CompletionDataArguments(TextDataArguments):
    """A labelled text dataset cast as completions (the fields of TextDataArguments, and how)."""

    prompt_template: str = field(default="Text: {text}\nSentiment:",
                                 metadata={"help": "The prompt, with {text} where the text goes."})
    answer_template: str = field(default=" {label}",
                                 metadata={"help": "The completion, with {label} where the label's name goes."})
    completion_only: bool = field(
        default=True,
        metadata={"help": "Learn (and measure) the answer's tokens only; the prompt's are labelled -100."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if "{text}" not in self.prompt_template:
            raise StudyArgumentsError(f"prompt_template must hold {{text}}, got {self.prompt_template!r}.")
        if "{label}" not in self.answer_template:
            raise StudyArgumentsError(f"answer_template must hold {{label}}, got {self.answer_template!r}.")


def boundary_tokens(tokenizer: Any) -> tuple[int | None, int]:
    """(beginning, end) of a sequence for a decoder: the tokenizer's BOS and EOS tokens, or for a
    BERT-style tokenizer (the packaged MiniLM's) its [CLS] and [SEP]. A tokenizer without an end
    token is refused: a completion must end, or the model never learns to stop."""
    begin = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end is None:
        raise StudyArgumentsError(
            f"The tokenizer ({type(tokenizer).__name__}) has no end-of-sequence token (eos or sep): set one "
            "(tokenizer.eos_token = ...) and save it with the model.")
    return begin, end


def ready_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer`` with a padding token (the end token, as is usual for decoders, when it has none)."""
    if tokenizer.pad_token_id is None:
        _, end = boundary_tokens(tokenizer)
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(end)
        logger.info("The tokenizer has no padding token: padding with its end token %r.", tokenizer.pad_token)
    return tokenizer


def encode_completion(tokenizer: Any, prompt: str, answer: str, max_length: int,
                      completion_only: bool) -> dict[str, list[int]]:
    """[begin] prompt answer [end], the prompt cut so that the whole fits in ``max_length``
    tokens; labels are the tokens themselves, -100 on the begin token and (completion-only) on the
    prompt."""
    begin, end = boundary_tokens(tokenizer)
    head = [] if begin is None else [begin]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]
    room = max_length - len(head) - len(answer_ids)
    if room < 1:
        raise StudyArgumentsError(f"max_length={max_length} leaves no room for the prompt after the answer "
                                  f"({len(answer_ids)} tokens): raise max_length.")
    prompt_ids = head + tokenizer(prompt, add_special_tokens=False)["input_ids"][:room]
    masked = len(prompt_ids) if completion_only else len(head)
    return {"input_ids": prompt_ids + answer_ids, "attention_mask": [1] * (len(prompt_ids) + len(answer_ids)),
            "labels": [IGNORE_INDEX] * masked + (prompt_ids + answer_ids)[masked:]}


def load_completions(data_args: CompletionDataArguments, tokenizer: Any) -> tuple[Any, Any]:
    """The train and eval splits of ``data_args.dataset`` as tokenised completions."""
    train, evaluation = load_train_and_eval(data_args)
    names = getattr(train.features[data_args.label_column], "names", None)  # a ClassLabel's; else the labels as is

    def encode(batch):
        pairs = zip(batch[data_args.text_column], batch[data_args.label_column])
        rows = [encode_completion(
            tokenizer, data_args.prompt_template.format(text=text),
            data_args.answer_template.format(label=names[label] if names else label), data_args.max_length,
            data_args.completion_only) for text, label in pairs]
        return {key: [row[key] for row in rows] for key in ("input_ids", "attention_mask", "labels")}

    train = train.map(encode, batched=True, remove_columns=train.column_names, desc="tokenising train")
    evaluation = evaluation.map(encode, batched=True, remove_columns=evaluation.column_names, desc="tokenising eval")
    return train, evaluation


def build_causal_lm_trainer(
    model_args: CausalModelArguments,
    data_args: CompletionDataArguments,
    stability: StabilityArguments,
    training: TrainingArguments,
    adapter: AdapterArguments | None = None,
) -> StabilityTrainer:
    """Tokenise the completions and return a StabilityTrainer whose model_init loads the decoder
    (with ``adapter``: and puts a PEFT adapter on it), batched by DataCollatorForSeq2Seq (the
    analysis pads with the same collator, so its loss is the training loss)."""
    import torch

    adapter = adapter or AdapterArguments()
    tokenizer = ready_tokenizer(load_tokenizer(model_args.model_name_or_path))
    train, evaluation = load_completions(data_args, tokenizer)
    dtype = getattr(torch, model_args.model_dtype)

    def model_init():
        # The Trainer seeds the global RNG (training.seed) before it calls model_init (LoRA's init).
        model = load_named(AutoModelForCausalLM, model_args.model_name_or_path, dtype=dtype)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return adapter.wrap(model, "CAUSAL_LM")

    name = model_args.model_name_or_path
    card = replace(stability, base_model=stability.base_model or (None if Path(name).exists() else name),
                   dataset_name=hub_dataset_name(data_args, stability))
    return StabilityTrainer(
        model_init=model_init,
        args=training,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX),
        stability_args=card,
    )
