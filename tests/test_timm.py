"""The analysis measures and permutation alignment on a timm VisionTransformer (fused qkv,
.blocks, tensor input). timm comes with the `vision` extra, which the test install includes
(torch 2.14.1 + torchvision 0.29.1, see docs/design.md)."""

import copy
import math

import pytest
import timm
import torch

from hf_stability.analysis import barrier, disagreement, l2_distance, layerwise_cka


def _vit(seed):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8)


def _data():
    g = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": i % 5} for i in range(40)]


def test_timm_vit_barrier_cka_l2_disagreement():
    a, b, data = _vit(0), _vit(1), _data()
    assert barrier(a, a, data, "loss", batch_size=16).barrier == pytest.approx(0.0, abs=1e-12)
    ab, ba = barrier(a, b, data, "loss", batch_size=16), barrier(b, a, data, "loss", batch_size=16)
    # up to float error relative to the losses themselves (TF32 convolutions on a GPU)
    assert ab.barrier == pytest.approx(ba.barrier, abs=1e-6 * max(ab.values))
    same = layerwise_cka(a, a, data, "mean", batch_size=16)
    assert same.layers == [f"blocks.{i}" for i in range(12)]
    assert same.cka == pytest.approx([1.0] * 12, abs=1e-9)
    assert disagreement(a, a, data) == 0.0
    result = l2_distance(a, b, per_layer=True)
    with torch.no_grad():
        direct = math.sqrt(sum(float(((p.cpu().double() - b.get_parameter(n).cpu().double()) ** 2).sum())
                             for n, p in a.named_parameters()))
    assert result.l2 == pytest.approx(direct, rel=1e-12)
    assert "blocks.3" in result.per_layer


def _trained_vit(**kwargs):
    """A timm ViT with LayerScale, trained a few steps so that norms and biases leave their init."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                              **kwargs)
    data = _data()
    x = torch.stack([row["pixel_values"] for row in data])
    y = torch.tensor([row["labels"] for row in data])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(10):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("variant", [{}, {"init_values": 0.1, "reg_tokens": 2}, {"global_pool": "avg"}])
def test_timm_vit_permutes_exactly_and_matching_recovers_the_permutation(variant):
    from hf_stability.analysis.alignment import (
        activation_matching,
        apply_permutation,
        permutation_spec,
        random_permutation,
        weight_matching,
    )

    torch.manual_seed(0)
    model = _trained_vit(**variant)
    spec = permutation_spec(model)
    assert spec.slots["residual"].size == model.embed_dim
    heads = [g for g in spec.groups if g.num_heads > 1]
    assert len(heads) == len(model.blocks) and heads[0].num_heads == model.blocks[0].attn.num_heads
    perm = random_permutation(spec, torch.Generator().manual_seed(1))
    permuted = apply_permutation(model, perm, spec)
    x = torch.stack([row["pixel_values"] for row in _data()[:8]])
    with torch.no_grad():
        assert torch.allclose(permuted(x), model(x), atol=1e-5, rtol=0)
    assert l2_distance(model, permuted).l2 > 1.0
    found = weight_matching(model, permuted, spec, device="cpu")
    assert l2_distance(model, apply_permutation(permuted, found.permutation, spec)).l2 == pytest.approx(0, abs=1e-6)
    found = activation_matching(model, permuted, spec, [{"pixel_values": row["pixel_values"]} for row in _data()],
                                batch_size=16)
    model.cpu(), permuted.cpu()  # activation matching ran on the GPU where there is one
    assert l2_distance(model, apply_permutation(permuted, found.permutation, spec)).l2 == pytest.approx(0, abs=1e-6)


def test_timm_vit_with_qk_norm_is_refused_naming_the_parameter():
    from hf_stability.analysis.alignment import permutation_spec
    from hf_stability.errors import UnsupportedArchitectureError

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, qk_norm=True)
    with pytest.raises(UnsupportedArchitectureError, match=r"'blocks\.0\.attn\.q_norm\.weight'"):
        permutation_spec(model)


def test_timm_vit_in_bf16_full_gets_its_input_in_bf16_and_a_float32_loss():
    """A timm model has no cast of its own: in bf16 it needs bf16 pixels (the Evaluator casts them),
    and its loss (the cross-entropy of its logits, PlainLogits) is taken in float32."""
    from hf_stability.analysis import EvalData, Evaluator

    a, data = _vit(0), EvalData(_data(), batch_size=16)
    evaluator = Evaluator(device="cpu", autocast_dtype=torch.bfloat16, weights_dtype=torch.bfloat16, progress=False)
    ours = evaluator.evaluate(a, data)
    cast, total = copy.deepcopy(a).to(torch.bfloat16).eval(), 0.0
    with torch.no_grad():
        for i in range(data.num_batches):
            batch = data.batch(i)
            logits = cast(batch["pixel_values"].to(torch.bfloat16))
            total += float(torch.nn.functional.cross_entropy(logits.float(), batch["labels"]).double()) * len(logits)
    assert ours.loss == pytest.approx(total / len(data), rel=1e-9)
