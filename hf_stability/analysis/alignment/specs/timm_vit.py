"""Permutation spec of timm's VisionTransformer (detected by class, without importing timm)."""

from __future__ import annotations

from torch import nn

from ..spec import ActivationRef, PermutationSpec
from .builder import SpecBuilder
from .registry import register_spec


def _is_timm_vision_transformer(model: nn.Module) -> bool:
    return any(
        cls.__name__ == "VisionTransformer" and cls.__module__.startswith("timm.") for cls in type(model).__mro__
    )


@register_spec(
    "timm VisionTransformer (class and register tokens, LayerScale, token or average pooling; no qk_norm)",
    _is_timm_vision_transformer,
)
def timm_vit_spec(model: nn.Module) -> PermutationSpec:
    """The spec of a timm VisionTransformer: the fused qkv's rows are [q; k; v], head-major."""
    builder = SpecBuilder(model, f"timm {type(model).__name__}")
    dim = model.patch_embed.proj.out_channels
    residual = builder.plain("residual", dim)
    for token in ("cls_token", "reg_token", "pos_embed"):
        if token in builder.params:
            builder.axis(token, builder.params[token].dim() - 1, residual)
    builder.linear("patch_embed.proj", None, residual)
    for norm in ("patch_embed.norm", "norm_pre", "norm", "fc_norm"):
        if isinstance(builder.module(norm), nn.LayerNorm):
            builder.norm(norm, residual)
    if builder.module("norm_pre") is not None:  # the residual stream entering the first block
        residual.activations.append(ActivationRef("norm_pre"))
    for i, block in enumerate(model.blocks):
        prefix = f"blocks.{i}"
        builder.norm(f"{prefix}.norm1", residual)
        builder.norm(f"{prefix}.norm2", residual)
        attn = block.attn
        qkv = f"{prefix}.attn.qkv"
        size = builder.module(qkv).out_features // 3
        qk, v = builder.heads(f"{prefix}.attn", size, attn.num_heads)
        builder.linear(qkv, residual, qk, out_start=0)
        builder.linear(qkv, None, qk, out_start=size)
        builder.linear(qkv, None, v, out_start=2 * size)
        qk.activations += [ActivationRef(qkv, 0), ActivationRef(qkv, size)]
        v.activations.append(ActivationRef(qkv, 2 * size))
        builder.linear(f"{prefix}.attn.proj", v, residual)
        for scale in ("ls1.gamma", "ls2.gamma"):
            if f"{prefix}.{scale}" in builder.params:
                builder.axis(f"{prefix}.{scale}", 0, residual)
        ffn = builder.plain(f"{prefix}.mlp", block.mlp.fc1.out_features)
        builder.linear(f"{prefix}.mlp.fc1", residual, ffn)
        builder.linear(f"{prefix}.mlp.fc2", ffn, residual)
        ffn.activations.append(ActivationRef(f"{prefix}.mlp.fc1"))
        residual.activations.append(ActivationRef(prefix))
    if isinstance(builder.module("head"), nn.Linear):
        builder.linear("head", residual, None)
        return builder.finish()
    return builder.finish({"output": residual.name})  # features, without a classifier
