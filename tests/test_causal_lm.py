"""Causal language models (issue 23, the CPU part): butterfly() on tiny random-init Llama (with
grouped-query attention) and GPT-2 models, full fine-tuning and LoRA, batched by transformers'
language-modelling collators; the analysis batches the saved examples as training did, so its
token-level loss is the model's own, padding and prompt tokens (-100) left out."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
)

from hf_stability import StabilityArguments, StabilityTrainer
from hf_stability.analysis import AnalyzeArguments, analyze_run
from hf_stability.analysis.loading import load_run_model
from hf_stability.data import load_tokenizer, load_tweet_sentiment
from hf_stability.run_directory import RunDirectory

MAX_LENGTH = 24


def _tokenizer():
    return load_tokenizer()  # MiniLM's WordPiece tokenizer: any tokenizer with a pad token will do


def _texts(n: int) -> list[str]:
    return list(load_tweet_sentiment()["train"].select(range(n))["text"])


def _plain_text(n: int) -> Dataset:
    """Tweets of different lengths: the collator pads them and labels the padding -100."""
    encoded = _tokenizer()(_texts(n), truncation=True, max_length=MAX_LENGTH)
    return Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})


def _completions(n: int) -> Dataset:
    """Tweet -> sentiment as a completion: the prompt's tokens are labelled -100 (only the answer
    counts), as completion-only supervised fine-tuning does."""
    tokenizer = _tokenizer()
    splits = load_tweet_sentiment()["train"].select(range(n))
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for text, label in zip(splits["text"], splits["label"]):
        prompt = tokenizer(text, truncation=True, max_length=MAX_LENGTH - 4, add_special_tokens=False)["input_ids"]
        answer = tokenizer(f" sentiment {label}", add_special_tokens=False)["input_ids"]
        rows["input_ids"].append(prompt + answer)
        rows["attention_mask"].append([1] * (len(prompt) + len(answer)))
        rows["labels"].append([-100] * len(prompt) + answer)
    return Dataset.from_dict(rows)


def _llama() -> LlamaForCausalLM:
    # grouped-query attention (4 query heads, 2 key/value heads); the Trainer seeds before model_init
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=_tokenizer().vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=_tokenizer().pad_token_id))


def _gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=_tokenizer().vocab_size, n_embd=32, n_layer=2, n_head=2,
                                      n_positions=64, pad_token_id=_tokenizer().pad_token_id))


def _lora_llama():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               task_type="CAUSAL_LM"))


def _study(out, model_init, train, evaluation, collator) -> StabilityTrainer:
    args = TrainingArguments(str(out), max_steps=6, per_device_train_batch_size=8, per_device_eval_batch_size=64,
                             learning_rate=3e-3, seed=5, use_cpu=True, report_to="none", save_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0)
    return StabilityTrainer(model_init=model_init, args=args, train_dataset=train, eval_dataset=evaluation,
                            data_collator=collator,
                            stability_args=StabilityArguments(spawn_steps=[0, 3], num_children=1, divergence_every=3,
                                                              perturbation_scale=0.1))


def _weights(final):
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(final / name)


@pytest.mark.parametrize("model_init, data, collator", [
    (_llama, _plain_text, lambda tokenizer: DataCollatorForLanguageModeling(tokenizer, mlm=False)),
    (_gpt2, _plain_text, lambda tokenizer: DataCollatorForLanguageModeling(tokenizer, mlm=False)),
    (_llama, _completions, lambda tokenizer: DataCollatorForSeq2Seq(tokenizer)),
    (_lora_llama, _plain_text, lambda tokenizer: DataCollatorForLanguageModeling(tokenizer, mlm=False)),
], ids=["llama-gqa", "gpt2", "llama-completion-only", "llama-lora"])
def test_a_causal_lm_study_trains_its_control_bitwise_and_analyses_its_own_token_loss(tmp_path, model_init, data,
                                                                                      collator):
    dataset = data(96)
    train, evaluation = dataset.select(range(64)), dataset.select(range(64, 96))
    run = tmp_path / "run"
    result = _study(run, model_init, train, evaluation, collator(_tokenizer())).butterfly()
    assert {r.status for r in result.children} == {"done"}
    parent = _weights(run / "parent/final")
    for t in (0, 3):
        control = _weights(run / f"children/t{t}/c0/final")
        assert all(torch.equal(parent[name], control[name]) for name in parent), t
        child = _weights(run / f"children/t{t}/c1/final")
        assert any(not torch.equal(parent[name], child[name]) for name in parent), t

    report = analyze_run(run, AnalyzeArguments(train_samples=16, batch_size=16, alphas=3, cpu=True))
    assert report.settings.head.name == "causal language model"
    assert report.settings.pooling == "all"  # a next-token head reads every token
    # the analysis's token-level loss (two batches of 16) is the model's own loss over all 32 eval
    # examples in one batch, every predicted token counted once (the Trainer's eval_loss is not: for
    # GPT-2, transformers 5.24 divides by the tokens before the shift)
    parent_model = load_run_model(RunDirectory(run), run / "parent/final", None).eval()
    with torch.no_grad():
        own = float(parent_model(**collator(_tokenizer())([evaluation[i] for i in range(32)])).loss)
    assert report.parent["eval"].loss == pytest.approx(own, rel=1e-5)
    for pair in report.parent_child():
        loss = pair.barriers["eval"]["loss"]
        assert loss.endpoint_a == pytest.approx(own, rel=1e-5)
        if pair.is_control:
            assert pair.l2.l2 == 0.0 and loss.barrier == 0.0 and pair.disagreement == 0.0
    # decoders are aligned too (grouped-query heads, rotary dimensions kept: test_alignment_families.py)
    assert report.settings.alignment.method == "weight" and report.settings.alignment.skipped is None
    for pair in report.parent_child():
        assert pair.aligned is not None and pair.aligned.l2.l2 <= pair.l2.l2 + 1e-9
        if pair.is_control:
            assert pair.aligned.l2.l2 == 0.0


def test_the_analysis_pads_as_training_did_and_refuses_a_run_without_its_tokenizer(tmp_path):
    import shutil

    from hf_stability.errors import RunDirectoryError

    dataset = _plain_text(48)
    run = tmp_path / "run"
    _study(run, _gpt2, dataset.select(range(32)), dataset.select(range(32, 48)),
           DataCollatorForLanguageModeling(_tokenizer(), mlm=False, pad_to_multiple_of=8)).butterfly()
    record = json.loads((run / "data" / "collator.json").read_text())
    assert record == {"collator": "causal_lm", "pad_to_multiple_of": 8}
    from hf_stability.analysis.loading import run_collator

    batch = run_collator(RunDirectory(run))([dataset[i] for i in range(3)])
    assert batch["input_ids"].shape[1] % 8 == 0
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    shutil.rmtree(run / "data" / "tokenizer")
    for name in ("tokenizer_config.json", "tokenizer.json"):  # (runs of earlier versions: the parent's final/)
        (run / "parent/final" / name).unlink(missing_ok=True)
    with pytest.raises(RunDirectoryError, match="holds no tokenizer to pad with"):
        run_collator(RunDirectory(run))


def test_the_completion_study_cuts_prompts_to_fit_loads_a_bf16_base_and_refuses_what_cannot_work(tmp_path):
    from transformers import TrainingArguments

    from hf_stability.errors import StudyArgumentsError
    from hf_stability.studies.adapters import AdapterArguments
    from hf_stability.studies.causal_lm import (
        CausalModelArguments,
        CompletionDataArguments,
        build_causal_lm_trainer,
        encode_completion,
        ready_tokenizer,
    )

    padless = _tokenizer()
    padless.pad_token = None  # as GPT-2's and Llama's tokenizers come: it pads with its end token
    assert ready_tokenizer(padless).pad_token_id == padless.sep_token_id
    tokenizer = _tokenizer()
    row = encode_completion(tokenizer, "a long prompt " * 20, " positive", max_length=12, completion_only=True)
    assert len(row["input_ids"]) == 12 and row["input_ids"][0] == tokenizer.cls_token_id
    learnt = [t for t, y in zip(row["input_ids"], row["labels"]) if y != -100]
    assert tokenizer.decode(learnt) == "positive [SEP]"  # the answer always fits; the prompt was cut
    everything = encode_completion(tokenizer, "a prompt", " positive", max_length=12, completion_only=False)
    assert everything["labels"][1:] == everything["input_ids"][1:]
    with pytest.raises(StudyArgumentsError, match="leaves no room for the prompt"):
        encode_completion(tokenizer, "a prompt", " positive", max_length=3, completion_only=True)
    with pytest.raises(StudyArgumentsError, match="pretrain one with recipes/pretrain_causal_lm.py"):
        CausalModelArguments()
    with pytest.raises(StudyArgumentsError, match="model_dtype must be one of"):
        CausalModelArguments("somewhere", model_dtype="int8")
    with pytest.raises(StudyArgumentsError, match="prompt_template must hold"):
        CompletionDataArguments(prompt_template="no text here")

    saved = tmp_path / "decoder"
    _llama().save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    trainer = build_causal_lm_trainer(
        CausalModelArguments(str(saved), model_dtype="bfloat16"), CompletionDataArguments(max_train_samples=8,
                                                                                         max_eval_samples=4),
        StabilityArguments(spawn_steps=[0]), TrainingArguments(str(tmp_path / "run"), use_cpu=True, report_to="none"),
        AdapterArguments(peft="lora", target_modules=["q_proj", "v_proj"]))
    model = trainer.call_model_init()
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)  # the adapter trains in float32
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "lora_" not in n)  # on a bf16 base
