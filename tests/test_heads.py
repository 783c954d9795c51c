"""Every head the Trainer trains, measured right (analysis/heads.py): the loss barrier uses the
model's own loss weighted by the entries it averages over, the error and disagreement count what
the head predicts (tokens labelled -100 never count), a head without an error rule gets the other
measures, and a whole study of each head trains and analyses with the defaults."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from helpers import free_port, tiny_bert_config, training_args, tweets
from transformers import (
    BertForMultipleChoice,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from hf_stability import StabilityArguments, StabilityTrainer
from hf_stability.analysis import AnalyzeArguments, EvalData, Evaluator, analyze_run, barrier, disagreement
from hf_stability.analysis.heads import IGNORE_INDEX, head_of
from hf_stability.analysis.representations import compare_representations
from hf_stability.errors import AnalysisDataError

N = 48  # examples
SCRIPTS = Path(__file__).parent / "scripts"


def _tokens():
    train, _ = tweets(n_train=N, n_eval=16, max_length=24)
    return train.rename_column("label", "labels")


def single_label():
    return BertForSequenceClassification, {}, _tokens()


def multi_label():
    data = _tokens()
    labels = [[float(y == c or (i + c) % 4 == 0) for c in range(3)] for i, y in enumerate(data["labels"])]
    data = data.remove_columns("labels").add_column("labels", labels)
    return BertForSequenceClassification, {"problem_type": "multi_label_classification"}, data


def regression():
    data = _tokens()
    data = data.remove_columns("labels").add_column("labels", [float(y) - 1.0 for y in data["labels"]])
    return BertForSequenceClassification, {"num_labels": 1}, data


def token_classification():
    data = _tokens()
    labels = [[IGNORE_INDEX if (m == 0 or t in (101, 102)) else t % 3 for t, m in zip(ids, mask)]
              for ids, mask in zip(data["input_ids"], data["attention_mask"])]
    return BertForTokenClassification, {}, data.remove_columns("labels").add_column("labels", labels)


def multiple_choice():
    data = _tokens()
    rows = {key: [] for key in ("input_ids", "attention_mask", "token_type_ids")}
    for i in range(len(data)):
        j = (i + 7) % len(data)
        order = (i, j) if i % 2 == 0 else (j, i)  # the right choice is the example itself
        for key in rows:
            rows[key].append([data[k][key] for k in order])
    return BertForMultipleChoice, {}, Dataset.from_dict({**rows, "labels": [i % 2 for i in range(len(data))]})


def question_answering():
    data = _tokens().remove_columns("labels")
    lengths = [sum(mask) for mask in data["attention_mask"]]
    data = data.add_column("start_positions", [min(2, n - 2) for n in lengths])
    data = data.add_column("end_positions", [min(4, n - 2) for n in lengths])
    return BertForQuestionAnswering, {"num_labels": 2}, data


def _tiny_llama(config):
    """A tiny Llama with grouped-query attention, its vocabulary that of the BERT ``config``."""
    return LlamaForCausalLM(LlamaConfig(vocab_size=config.vocab_size, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, pad_token_id=0))


def causal_lm():
    """Next-token prediction with completion-only labels: padding and each tweet's first 5 tokens
    (the "prompt") are labelled -100, so the tokens that count differ from row to row."""
    data = _tokens().remove_columns(["labels", "token_type_ids"])
    labels = [[t if (m == 1 and i >= 5) else IGNORE_INDEX for i, (t, m) in enumerate(zip(ids, mask))]
              for ids, mask in zip(data["input_ids"], data["attention_mask"])]
    return _tiny_llama, {}, data.add_column("labels", labels)


HEADS = {f.__name__: f for f in (single_label, multi_label, regression, token_classification, multiple_choice,
                                 question_answering, causal_lm)}


def _models(build, overrides):
    config = tiny_bert_config(**{"num_labels": 3, **overrides})
    torch.manual_seed(0)
    a = build(config).eval()
    torch.manual_seed(1)
    b = build(config).eval()
    return a, b


def _independent_loss_and_error(name, model, data):
    """The loss and error of the whole data in one forward pass, computed from the logits here."""
    batch = {k: torch.tensor(data[k]) for k in data.column_names}
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")})
    if name == "question_answering":
        s, e = batch["start_positions"], batch["end_positions"]
        loss = (F.cross_entropy(out.start_logits, s) + F.cross_entropy(out.end_logits, e)) / 2
        wrong = ~((out.start_logits.argmax(-1) == s) & (out.end_logits.argmax(-1) == e))
        return float(loss), float(wrong.float().mean())
    logits, labels = out.logits, batch["labels"]
    if name == "causal_lm":  # the logits at position i predict the token at i + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
        keep = labels != IGNORE_INDEX
        return (float(F.cross_entropy(logits[keep], labels[keep])),
                float((logits.argmax(-1)[keep] != labels[keep]).float().mean()))
    if name == "multi_label":
        return (float(F.binary_cross_entropy_with_logits(logits, labels)),
                float(((logits > 0) != (labels > 0.5)).float().mean()))
    if name == "regression":
        return float(F.mse_loss(logits.squeeze(-1), labels)), None
    if name == "token_classification":
        keep = labels != IGNORE_INDEX
        return (float(F.cross_entropy(logits[keep], labels[keep])),
                float((logits.argmax(-1)[keep] != labels[keep]).float().mean()))
    return float(F.cross_entropy(logits, labels)), float((logits.argmax(-1) != labels).float().mean())


@pytest.mark.parametrize("name", list(HEADS))
def test_the_loss_and_error_of_every_head_are_those_of_the_whole_data(name):
    build, overrides, data = HEADS[name]()
    model, _ = _models(build, overrides)
    sums = Evaluator(device="cpu").evaluate(model, EvalData(data, batch_size=10))  # uneven batches: 10, ..., 8
    loss, error = _independent_loss_and_error(name, model, data)
    assert sums.loss == pytest.approx(loss, rel=1e-5)
    assert sums.error == (None if error is None else pytest.approx(error, abs=1e-6))  # (float32 means here)


@pytest.mark.parametrize("name", list(HEADS))
def test_barriers_and_disagreement_follow_the_head(name):
    build, overrides, data = HEADS[name]()
    a, b = _models(build, overrides)
    data = EvalData(data, batch_size=16)
    evaluator = Evaluator(device="cpu", progress=False)
    head = head_of(a, data.batch(0))
    loss = barrier(a, b, data, "loss", alphas=5, evaluator=evaluator)
    assert barrier(a, a, data, "loss", alphas=3, evaluator=evaluator).barrier == pytest.approx(0.0, abs=1e-6)
    assert barrier(b, a, data, "loss", alphas=5, evaluator=evaluator).barrier == pytest.approx(loss.barrier, abs=1e-5)
    assert disagreement(a, a, data, evaluator=evaluator) in (0.0, None)
    if head.error_rule is None:  # regression: no error, no disagreement, a clear message for the error barrier
        assert disagreement(a, b, data, evaluator=evaluator) is None
        with pytest.raises(AnalysisDataError, match="regression head has no error rule"):
            barrier(a, b, data, "error", alphas=3, evaluator=evaluator)
        return
    assert 0.0 <= barrier(a, b, data, "error", alphas=5, evaluator=evaluator).endpoint_a <= 1.0
    rate = disagreement(a, b, data, evaluator=evaluator)
    expected = _independent_disagreement(name, a, b, data.dataset)
    assert rate == pytest.approx(expected, abs=1e-6)


def _independent_disagreement(name, a, b, data):
    batch = {k: torch.tensor(data[k]) for k in data.column_names}
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")}
    with torch.no_grad():
        out_a, out_b = a(**inputs), b(**inputs)
    if name == "question_answering":
        same = ((out_a.start_logits.argmax(-1) == out_b.start_logits.argmax(-1))
                & (out_a.end_logits.argmax(-1) == out_b.end_logits.argmax(-1)))
        return 1.0 - float(same.float().mean())
    if name == "multi_label":
        return float(((out_a.logits > 0) != (out_b.logits > 0)).float().mean())
    differ = out_a.logits.argmax(-1) != out_b.logits.argmax(-1)
    if name == "token_classification":  # only the tokens that carry a label
        return float(differ[batch["labels"] != IGNORE_INDEX].float().mean())
    if name == "causal_lm":  # only the positions whose next token carries a label
        return float(differ[:, :-1][batch["labels"][:, 1:] != IGNORE_INDEX].float().mean())
    return float(differ.float().mean())


def measured(name: str, accelerator=None) -> dict:
    """Loss, error, disagreement and loss barrier of a head's two models, in 1 process or under
    ``accelerator`` (batches of 10 of 48 examples: uneven shards, uneven token counts)."""
    build, overrides, data = HEADS[name]()
    a, b = _models(build, overrides)
    evaluator = Evaluator(accelerator, device="cpu", progress=False)
    data = EvalData(data, batch_size=10)
    sums = evaluator.evaluate(a, data)
    figures = {"loss": sums.loss, "error": sums.error, "disagreement": disagreement(a, b, data, evaluator=evaluator),
               "loss_barrier": barrier(a, b, data, "loss", alphas=3, evaluator=evaluator).barrier}
    if name == "causal_lm":  # and a language model's perplexity, and CKA at the last or at every real token
        figures["perplexity_barrier"] = barrier(a, b, data, "perplexity", alphas=3, evaluator=evaluator).barrier
        for pooling in ("last", "all"):  # (NaN before the first layer at the last token: every tweet ends in [SEP])
            figures[f"cka_{pooling}"] = compare_representations(a, b, data, pooling, evaluator).cka
    return figures


def test_two_processes_give_the_numbers_of_one_for_every_head(tmp_path):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "two.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(SCRIPTS / "heads_two_processes.py"), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads(out.read_text())
    for name in HEADS:
        one = measured(name)
        assert one.keys() == two[name].keys()
        for key, value in one.items():
            expected = None if value is None else pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True)
            assert two[name][key] == expected, (name, key)


def test_token_classification_counts_no_position_labelled_minus_100():
    build, overrides, data = HEADS["token_classification"]()
    a, b = _models(build, overrides)
    rate = disagreement(a, b, data, batch_size=16)
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        everywhere = float((a(**batch).logits.argmax(-1) != b(**batch).logits.argmax(-1)).float().mean())
    assert rate != pytest.approx(everywhere)  # what counting the padding and special tokens would give


@pytest.mark.parametrize("name", list(HEADS))
def test_a_study_of_every_head_trains_and_analyses_with_the_defaults(tmp_path, name):
    build, overrides, data = HEADS[name]()
    config = tiny_bert_config(**{"num_labels": 3, **overrides})
    trainer = StabilityTrainer(
        model_init=lambda: (torch.manual_seed(0), build(config))[1], args=training_args(tmp_path, max_steps=3),
        train_dataset=data, eval_dataset=data.select(range(16)),
        stability_args=StabilityArguments(spawn_steps=[1], num_children=1, perturbation_scale=0.5),
    )
    trainer.butterfly()
    report = analyze_run(tmp_path, AnalyzeArguments(train_samples=16, batch_size=8, alphas=3, cpu=True))
    control, child = sorted(report.parent_child(1), key=lambda p: not p.is_control)
    assert control.l2.l2 == 0.0 and child.l2.l2 > 0
    assert control.barriers["eval"]["loss"].barrier == pytest.approx(0.0, abs=1e-7)
    has_error = name != "regression"
    assert ("error" in child.barriers["eval"]) is has_error and (child.disagreement is not None) is has_error
    assert (report.settings.head.error is None) is not has_error
    assert report.settings.pooling == ("all" if name in ("token_classification", "question_answering", "causal_lm")
                                       else "cls")
    # perplexity along the path: exp of the loss at every alpha, for a language model only
    assert ("perplexity" in child.barriers["eval"]) is (name == "causal_lm")
    if name == "causal_lm":
        loss, perplexity = child.barriers["eval"]["loss"], child.barriers["eval"]["perplexity"]
        assert perplexity.values == pytest.approx([math.exp(v) for v in loss.values], rel=1e-12)
        assert report.run.task == "text-generation" and report.settings.head.perplexity
    assert all(v is None or (math.isfinite(v) and -1e-6 <= v <= 1 + 1e-6) for v in child.cka.values)
    # the default alignment: BERT has a permutation spec (every head but those the spec lacks)
    assert report.settings.alignment.method in ("weight", "none")
    if report.settings.alignment.method == "none":
        assert report.settings.alignment.skipped


def _readout_cases():
    from transformers import (
        BeitConfig,
        BeitForImageClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
        SwinConfig,
        SwinForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    small = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=40, num_labels=3)
    image = dict(image_size=32, hidden_size=24, patch_size=8, **small)
    # (model, how its head maps the pooled last hidden states to its logits)
    return {
        "bert": (BertForSequenceClassification(tiny_bert_config()),
                 lambda m, h: m.classifier(m.bert.pooler(h[:, None]))),
        "gpt2": (GPT2ForSequenceClassification(GPT2Config(vocab_size=30522, n_embd=24, n_layer=2, n_head=2,
                                                          pad_token_id=0, num_labels=3)), lambda m, h: m.score(h)),
        "llama": (LlamaForSequenceClassification(LlamaConfig(vocab_size=30522, hidden_size=24, num_key_value_heads=1,
                                                             pad_token_id=0, **small)), lambda m, h: m.score(h)),
        "vit": (ViTForImageClassification(ViTConfig(**image)), lambda m, h: m.classifier(m.vit.layernorm(h))),
        "beit": (BeitForImageClassification(BeitConfig(**image)),
                 lambda m, h: m.classifier(m.beit.pooler.layernorm(h))),
        "swin": (SwinForImageClassification(SwinConfig(image_size=32, patch_size=4, embed_dim=12, depths=[1, 1],
                                                       num_heads=[2, 2], window_size=4, num_labels=3)), None),
    }


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "vit", "beit", "swin"])
def test_cka_reads_the_tokens_the_model_s_own_head_reads(name):
    """The readout pooled from the last hidden states is what the head turns into the logits."""
    from hf_stability.analysis.heads import head_readout
    from hf_stability.analysis.representations import pool

    torch.manual_seed(0)
    model, head = _readout_cases()[name]
    model.eval()
    readout = head_readout(model)
    if name in ("bert", "gpt2", "llama"):
        ids = torch.randint(1000, 2000, (4, 9))
        mask = torch.ones_like(ids)
        mask[1, 6:], mask[2, 3:] = 0, 0  # right padding of two lengths
        ids[mask == 0] = 0
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    else:
        mask = None
        out = model(pixel_values=torch.randn(3, 3, 32, 32), output_hidden_states=True)
    last = out.hidden_states[-1]
    if name == "swin":  # Swin normalises every token, then averages them
        last, head = model.swin.layernorm(last), lambda m, h: m.classifier(h)
    expected = {"bert": "cls", "vit": "cls", "gpt2": "last", "llama": "last", "beit": "mean", "swin": "mean"}[name]
    assert readout.pooling.value == expected
    with torch.no_grad():
        assert torch.allclose(head(model, pool(last, mask, readout)), out.logits, atol=1e-5)


def test_an_architecture_without_a_permutation_spec_is_analysed_unaligned_and_says_why(tmp_path):
    from transformers import FunnelConfig, FunnelForSequenceClassification

    from hf_stability.errors import UnsupportedArchitectureError
    from hf_stability.report import write_report

    train, test = tweets(n_train=48, n_eval=16, max_length=24)
    config = FunnelConfig(vocab_size=30522, block_sizes=[1, 1], d_model=32, n_head=2, d_head=16, d_inner=64,
                          num_labels=3)
    StabilityTrainer(
        model_init=lambda: (torch.manual_seed(0), FunnelForSequenceClassification(config))[1],
        args=training_args(tmp_path, max_steps=3), train_dataset=train, eval_dataset=test,
        stability_args=StabilityArguments(spawn_steps=[1], num_children=1, perturbation_scale=0.5),
    ).butterfly()
    report = analyze_run(tmp_path, AnalyzeArguments(train_samples=0, alphas=3, cpu=True))  # alignment "auto"
    assert report.settings.alignment.method == "none"
    assert report.settings.alignment.skipped.startswith("No permutation spec for FunnelForSequenceClassification")
    assert all(p.aligned is None and p.l2.l2 >= 0 for p in report.pairs)
    card = write_report(tmp_path).card.read_text()
    assert "**Alignment skipped**: No permutation spec for FunnelForSequenceClassification" in card
    # asked for explicitly, alignment is an error that says how to skip it
    with pytest.raises(UnsupportedArchitectureError, match=r"alignment='none' \(--alignment none\)"):
        analyze_run(tmp_path, AnalyzeArguments(train_samples=0, alphas=3, cpu=True, alignment="weight"))
