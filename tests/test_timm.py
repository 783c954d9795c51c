"""The analysis measures on a timm VisionTransformer (fused qkv, .blocks, tensor input).

timm imports torchvision, which does not load with the CPU torch of the test install (see
docs/design.md): this module runs where timm imports (the GPU machines, a vision install) and
is skipped elsewhere.
"""

import math

import pytest
import torch

timm = pytest.importorskip("timm")

from hf_stability.analysis import barrier, disagreement, l2_distance, layerwise_cka  # noqa: E402


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
