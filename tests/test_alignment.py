"""Permutation alignment: permuted models compute the same function, weight and activation
matching recover a planted permutation of trained models exactly, bad input is refused.

BERT: the packaged pretrained MiniLM on real tweets. ViT: a small transformers ViT trained for
a few steps on Fashion-MNIST. (timm: tests/test_timm.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_bert, tweets
from transformers import (
    BertForTokenClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from hf_stability.analysis import barrier, l2_distance
from hf_stability.analysis.alignment import (
    activation_matching,
    apply_permutation,
    identity_permutation,
    objective,
    permutation_spec,
    permute_state,
    random_permutation,
    register_spec,
    supported_architectures,
    weight_matching,
)
from hf_stability.data import load_fashion_mnist, load_sequence_classifier
from hf_stability.errors import ArchitectureMismatchError, UnsupportedArchitectureError


@pytest.fixture(scope="module")
def minilm():
    return load_sequence_classifier(num_labels=3, seed=0).eval()


@pytest.fixture(scope="module")
def tweet_batch():
    _, test = tweets()
    return {k: torch.tensor(test[k][:16]) for k in ("input_ids", "attention_mask", "token_type_ids")}


def _images(n: int, start: int = 0):
    rows = load_fashion_mnist(classes=[0, 1, 2, 3, 4], max_per_split=start + n)["train"].select(range(start, start + n))
    pixels = torch.tensor(np.stack([np.asarray(img) for img in rows["image"]]), dtype=torch.float32).unsqueeze(1) / 255
    return pixels, torch.tensor(rows["label"])


@pytest.fixture(scope="module")
def trained_vit():
    """A ViT trained for 40 steps on Fashion-MNIST (so LayerNorms and heads are no longer at init)."""
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=48, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=96, num_labels=5)
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    pixels, labels = _images(320)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        i = (step * 32) % 320
        loss = model(pixel_values=pixels[i : i + 32], labels=labels[i : i + 32]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _planted(model, seed=1):
    spec = permutation_spec(model)
    perm = random_permutation(spec, torch.Generator().manual_seed(seed))
    return spec, perm, apply_permutation(model, perm, spec)


def _moved_heads(spec, perm):
    """How many attention heads a permutation moved to another position."""
    moved = 0
    for group in spec.groups:
        if group.num_heads > 1:
            heads = perm[group.slots[0].name].view(group.num_heads, group.head_dim)[:, 0] // group.head_dim
            moved += int((heads != torch.arange(group.num_heads)).sum())
    return moved


def test_spec_sizes_come_from_the_config(minilm, trained_vit):
    for model in (minilm, trained_vit):
        config = model.config
        spec = permutation_spec(model)
        slots = spec.slots
        assert slots["residual"].size == config.hidden_size
        attention = [g for g in spec.groups if g.num_heads > 1]
        ffn = [s for name, s in slots.items() if name.endswith(("ffn", "mlp"))]
        assert len(attention) == len(ffn) == config.num_hidden_layers
        assert {g.num_heads for g in attention} == {config.num_attention_heads}
        assert {g.head_dim for g in attention} == {config.hidden_size // config.num_attention_heads}
        assert {s.size for s in ffn} == {config.intermediate_size}
        # every floating parameter is accounted for, and each is the model's own shape
        assert spec.shapes == {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_permuted_bert_computes_the_same_logits(minilm, tweet_batch):
    spec, perm, permuted = _planted(minilm)
    assert _moved_heads(spec, perm) > 0
    assert l2_distance(minilm, permuted).l2 > 1.0  # the weights did move
    with torch.no_grad():
        assert torch.allclose(permuted(**tweet_batch).logits, minilm(**tweet_batch).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta", "bert-token"])
def test_other_bert_layout_models_permute_exactly(family):
    size = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                num_labels=3, max_position_embeddings=40)
    torch.manual_seed(0)
    model = {
        "roberta": lambda: RobertaForSequenceClassification(RobertaConfig(**size)),
        "xlm-roberta": lambda: XLMRobertaForSequenceClassification(XLMRobertaConfig(**size)),
        "bert-token": lambda: BertForTokenClassification(tiny_bert(0, vocab_size=120).config),
    }[family]().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:  # move them off their init values
                p.add_(0.1 * torch.randn_like(p))
    spec, perm, permuted = _planted(model)
    assert _moved_heads(spec, perm) > 0
    ids = torch.randint(5, 120, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(permuted(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=0)
    found = weight_matching(model, permuted, spec, device="cpu")
    assert l2_distance(model, apply_permutation(permuted, found.permutation, spec)).l2 < 1e-6


def test_permuted_vit_computes_the_same_logits(trained_vit):
    spec, perm, permuted = _planted(trained_vit)
    assert _moved_heads(spec, perm) > 0
    pixels, _ = _images(16, start=320)
    with torch.no_grad():
        assert torch.allclose(permuted(pixels).logits, trained_vit(pixels).logits, atol=1e-5, rtol=0)


def test_weight_matching_recovers_a_planted_permutation_of_minilm(minilm, tweet_batch):
    spec, _, permuted = _planted(minilm, seed=3)
    result = weight_matching(minilm, permuted, spec, device="cpu")
    aligned = apply_permutation(permuted, result.permutation, spec)
    assert result.converged and result.iterations < 100
    assert l2_distance(minilm, aligned).l2 == pytest.approx(0.0, abs=1e-6)
    assert result.objective == pytest.approx(objective(minilm, minilm, identity_permutation(spec), spec), rel=1e-6)
    _, test = tweets()
    data = [dict(row) for row in test.select(range(32))]
    assert barrier(minilm, aligned, data, "loss", alphas=5, batch_size=16).barrier == pytest.approx(0.0, abs=1e-5)


def test_activation_matching_recovers_a_planted_permutation_on_real_tweets(minilm):
    spec, _, permuted = _planted(minilm, seed=4)
    train, _ = tweets()
    data = [{k: row[k] for k in ("input_ids", "attention_mask", "token_type_ids")} for row in train.select(range(48))]
    result = activation_matching(minilm, permuted, spec, data, batch_size=16)
    assert l2_distance(minilm, apply_permutation(permuted, result.permutation, spec)).l2 == pytest.approx(0.0, abs=1e-6)


def test_weight_and_activation_matching_recover_a_planted_permutation_of_a_vit(trained_vit):
    spec, _, permuted = _planted(trained_vit, seed=5)
    found = weight_matching(trained_vit, permuted, spec, device="cpu")
    aligned = apply_permutation(permuted, found.permutation, spec)
    assert l2_distance(trained_vit, aligned).l2 == pytest.approx(0, abs=1e-6)
    pixels, _ = _images(64, start=320)
    data = [{"pixel_values": p} for p in pixels]
    found = activation_matching(trained_vit, permuted, spec, data, batch_size=32)
    aligned = apply_permutation(permuted, found.permutation, spec)
    assert l2_distance(trained_vit, aligned).l2 == pytest.approx(0, abs=1e-6)


def test_weight_matching_improves_the_objective_and_is_seedable():
    a, b = tiny_bert(0), tiny_bert(1)
    spec = permutation_spec(a)
    first = weight_matching(a, b, spec, seed=0, device="cpu")
    again = weight_matching(a, b, spec, seed=0, device="cpu")
    assert all(torch.equal(first.permutation[k], again.permutation[k]) for k in first.permutation)
    assert first.converged and first.iterations >= 2  # the last sweep is the one that changed nothing
    assert first.objective == pytest.approx(objective(a, b, first.permutation, spec), rel=1e-9)
    assert first.objective > objective(a, b, identity_permutation(spec), spec)
    # the aligned model is closer to a, and is still b's function
    aligned = apply_permutation(b, first.permutation, spec)
    assert l2_distance(a, aligned).l2 < l2_distance(a, b).l2
    ids = torch.randint(5, 1000, (2, 10))
    with torch.no_grad():
        assert torch.allclose(aligned.eval()(input_ids=ids).logits, b.eval()(input_ids=ids).logits, atol=1e-5)
    # a model against itself: nothing to improve, the identity after one sweep
    same = weight_matching(a, a, spec, device="cpu")
    assert same.iterations == 1 and same.to_dict()["units_moved"] == 0


def test_unsupported_architectures_are_refused_listing_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match="No permutation spec for Sequential.*Supported: .*"
                                                           "transformers models built from common parts: BERT"):
        permutation_spec(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert "timm VisionTransformer" in supported_architectures() and "Swin" in supported_architectures()
    # (more refusals, of variants of supported families: tests/test_alignment_families.py)


def test_mismatched_configs_and_missing_tensors_are_named():
    a = tiny_bert(0)
    with pytest.raises(ArchitectureMismatchError, match=r"'bert\.embeddings\.word_embeddings\.weight' has shape"):
        weight_matching(a, tiny_bert(1, hidden_size=48), device="cpu")
    with pytest.raises(ArchitectureMismatchError, match=r"bert\.encoder\.layer\.2\."):
        weight_matching(tiny_bert(0, num_hidden_layers=3), a, device="cpu")
    spec = permutation_spec(a)
    with pytest.raises(ArchitectureMismatchError, match=r"'bert\.encoder\.layer\.1\..*' .* is missing from the model"):
        apply_permutation(tiny_bert(0, num_hidden_layers=1), identity_permutation(spec), spec)
    bad = identity_permutation(spec)
    bad["residual"] = torch.zeros(32, dtype=torch.long)
    with pytest.raises(ArchitectureMismatchError, match="'residual'] is not a permutation of 32 units"):
        apply_permutation(a, bad, spec)
    split = identity_permutation(spec)
    name = "bert.encoder.layer.0.attention.qk"
    split[name] = torch.cat([split[name][1:], split[name][:1]])  # crosses head boundaries
    with pytest.raises(ArchitectureMismatchError, match="heads must stay whole"):
        apply_permutation(a, split, spec)


def test_permute_state_gives_the_state_dict_of_the_permuted_model(minilm):
    spec, perm, permuted = _planted(minilm, seed=6)
    state = permute_state({n: p.detach() for n, p in minilm.named_parameters()}, spec, perm)
    for name, tensor in permuted.named_parameters():
        assert torch.equal(state[name], tensor.detach()), name


def test_a_registered_family_is_used_by_permutation_spec():
    from hf_stability.analysis.alignment.specs import FAMILIES, SpecBuilder

    class TwoLayerMLP(torch.nn.Sequential):
        pass

    def mlp_spec(model):
        builder = SpecBuilder(model, "two-layer MLP")
        hidden = builder.plain("hidden", model[0].out_features)
        builder.linear("0", None, hidden)
        builder.linear("2", hidden, None)
        return builder.finish()

    register_spec("two-layer MLP (test)", lambda m: isinstance(m, TwoLayerMLP))(mlp_spec)
    try:
        torch.manual_seed(0)
        model = TwoLayerMLP(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        spec = permutation_spec(model)
        assert spec.architecture == "two-layer MLP" and "two-layer MLP (test)" in supported_architectures()
        permuted = apply_permutation(model, random_permutation(spec, torch.Generator().manual_seed(1)), spec)
        x = torch.randn(5, 4)
        assert torch.allclose(permuted(x), model(x), atol=1e-6) and not torch.equal(permuted[0].weight, model[0].weight)
        found = weight_matching(model, permuted, spec, device="cpu")
        assert l2_distance(model, apply_permutation(permuted, found.permutation, spec)).l2 == pytest.approx(0, abs=1e-6)
    finally:
        FAMILIES[:] = [f for f in FAMILIES if f.description != "two-layer MLP (test)"]
