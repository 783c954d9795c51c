"""Swin: stages of their own width joined by patch merging. Each stage has its own residual
stream; a patch merging layer concatenates the four neighbours of a 2 x 2 window (four copies
of the stage's units), normalises them and projects them into the next stage's stream. The
blocks are the common parts (per-head relative position tables included)."""

from __future__ import annotations

from torch import nn

from ..spec import ActivationRef, PermutationSpec
from .builder import SpecBuilder
from .common_parts import derive_block
from .registry import register_spec


def _is_swin(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in ("swin", "swinv2", "donut-swin")


@register_spec("transformers Swin (base model, image classification)", _is_swin)
def swin_spec(model: nn.Module) -> PermutationSpec:
    builder = SpecBuilder(model, f"{type(model).__name__} (swin)")
    base = model.base_model
    prefix = "" if base is model else f"{model.base_model_prefix}."
    widths = [model.config.embed_dim * 2**s for s in range(len(model.config.depths))]
    streams = [builder.plain(f"stage{s}.residual", width) for s, width in enumerate(widths)]
    embeddings = f"{prefix}embeddings"
    for name, module in builder.modules.items():
        if not name.startswith(embeddings):
            continue
        if isinstance(module, nn.Conv2d):
            builder.linear(name, None, streams[0])
        elif isinstance(module, nn.LayerNorm):
            builder.norm(name, streams[0])
        for pname, param in module.named_parameters(recurse=False):
            full = f"{name}.{pname}"
            if full not in builder.covered and param.shape[-1:] == (widths[0],):
                builder.axis(full, param.dim() - 1, streams[0])  # absolute positions, mask token
    streams[0].activations.append(ActivationRef(embeddings))
    for s, stage in enumerate(base.encoder.layers):
        for b in range(len(stage.blocks)):
            derive_block(builder, f"{prefix}encoder.layers.{s}.blocks.{b}", streams[s])
        if getattr(stage, "downsample", None) is not None:
            merge = f"{prefix}encoder.layers.{s}.downsample"
            width = widths[s]
            for copy in range(4):
                builder.axis(f"{merge}.norm.weight", 0, streams[s], copy * width)
                builder.axis(f"{merge}.norm.bias", 0, streams[s], copy * width)
                builder.linear(f"{merge}.reduction", streams[s], None, in_start=copy * width)
            builder.linear(f"{merge}.reduction", None, streams[s + 1])
            streams[s + 1].activations.append(ActivationRef(f"{merge}.reduction"))
    last = streams[-1]
    builder.norm(f"{prefix}layernorm", last)
    last.activations.append(ActivationRef(f"{prefix}layernorm"))
    if isinstance(getattr(model, "classifier", None), nn.Linear):
        builder.linear("classifier", last, None)
    return builder.finish({"last_hidden_state": last.name, "pooler_output": last.name})
