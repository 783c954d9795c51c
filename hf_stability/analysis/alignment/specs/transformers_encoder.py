"""Permutation specs of transformers encoders with the BERT layout: BERT, RoBERTa, XLM-R,
CamemBERT (base model, sequence / token / question-answering / multiple-choice heads) and ViT
(ViTModel, ViTForImageClassification). Sizes come from the modules and the config; module
names are looked up among those of several transformers versions.

Anything else (another head, relative position embeddings...) leaves a parameter that no rule
covers, and the derivation stops with an error naming it.
"""

from __future__ import annotations

from torch import nn

from ....errors import UnsupportedArchitectureError
from ..spec import ActivationRef, PermutationSpec, Slot
from .builder import SpecBuilder
from .registry import register_spec, supported_architectures

BERT_LAYOUT_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")
MODEL_TYPES = (*BERT_LAYOUT_TYPES, "vit")

# Module names of each role inside one encoder layer, across transformers versions.
_ROLES = {
    "query": ("attention.self.query", "attention.attention.query", "attention.q_proj"),
    "key": ("attention.self.key", "attention.attention.key", "attention.k_proj"),
    "value": ("attention.self.value", "attention.attention.value", "attention.v_proj"),
    "attention_out": ("attention.output.dense", "attention.o_proj"),
    "ffn_in": ("intermediate.dense", "mlp.fc1"),
    "ffn_out": ("output.dense", "mlp.fc2"),
}


def _find_role(builder: SpecBuilder, layer: str, role: str) -> str:
    for suffix in _ROLES[role]:
        module = builder.module(f"{layer}.{suffix}")
        if isinstance(module, nn.Linear):
            return f"{layer}.{suffix}"
    raise UnsupportedArchitectureError(
        f"{builder.architecture}: layer {layer!r} has no {role} projection (looked for {', '.join(_ROLES[role])}). "
        f"Supported: {supported_architectures()}."
    )


def _encoder_layers(base: nn.Module) -> tuple[str, int]:
    for prefix, holder in (("encoder.layer", getattr(getattr(base, "encoder", None), "layer", None)),
                           ("layers", getattr(base, "layers", None))):
        if isinstance(holder, nn.ModuleList):
            return prefix, len(holder)
    raise UnsupportedArchitectureError(
        f"{type(base).__name__} has no encoder.layer or layers list. Supported: {supported_architectures()}."
    )


def _embeddings(builder: SpecBuilder, prefix: str, residual: Slot) -> None:
    """Every tensor of the embeddings module writes the residual stream on its last axis (or,
    for a convolution, on its output channels)."""
    embeddings = builder.module(prefix)
    if embeddings is None:
        raise UnsupportedArchitectureError(f"{builder.architecture} has no {prefix!r} module.")
    for name, module in embeddings.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if isinstance(module, nn.Embedding):
            builder.axis(f"{full}.weight", 1, residual)
        elif isinstance(module, nn.LayerNorm):
            builder.norm(full, residual)
        elif isinstance(module, nn.Conv2d):
            builder.linear(full, None, residual)
        for pname, param in module.named_parameters(recurse=False):
            if f"{full}.{pname}" not in builder.covered and param.dim() >= 1 and param.is_floating_point():
                builder.axis(f"{full}.{pname}", param.dim() - 1, residual)  # class token, positions
    residual.activations.append(ActivationRef(prefix))


def _matches(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in MODEL_TYPES


@register_spec(
    "transformers encoders of BERT layout (model_type " + ", ".join(BERT_LAYOUT_TYPES) + "; the base model or "
    "...ForSequenceClassification, ...ForTokenClassification, ...ForQuestionAnswering, ...ForMultipleChoice) "
    "and transformers ViT (ViTModel, ViTForImageClassification)",
    _matches,
)
def transformers_encoder_spec(model: nn.Module) -> PermutationSpec:
    """The spec of a BERT-layout or ViT model (absolute position embeddings only)."""
    config = model.config
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise UnsupportedArchitectureError(
            f"position_embedding_type={config.position_embedding_type!r} ties query dimensions across heads; "
            "only absolute position embeddings are supported."
        )
    builder = SpecBuilder(model, f"{type(model).__name__} (model_type {config.model_type})")
    base_prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, base_prefix, None) if base_prefix else None
    if base is None:  # the base model itself
        base, base_prefix = model, ""
    p = f"{base_prefix}." if base_prefix else ""
    hidden = config.hidden_size
    residual = builder.plain("residual", hidden)
    _embeddings(builder, f"{p}embeddings", residual)

    layers_prefix, num_layers = _encoder_layers(base)
    for i in range(num_layers):
        layer = f"{p}{layers_prefix}.{i}"
        names = {role: _find_role(builder, layer, role) for role in _ROLES}
        size = builder.module(names["query"]).out_features
        qk, v = builder.heads(f"{layer}.attention", size, config.num_attention_heads)
        for role, slot in (("query", qk), ("key", qk), ("value", v)):
            builder.linear(names[role], residual, slot)
            slot.activations.append(ActivationRef(names[role]))
        builder.linear(names["attention_out"], v, residual)
        ffn = builder.plain(f"{layer}.ffn", builder.module(names["ffn_in"]).out_features)
        builder.linear(names["ffn_in"], residual, ffn)
        builder.linear(names["ffn_out"], ffn, residual)
        ffn.activations.append(ActivationRef(names["ffn_in"]))
        layer_module = builder.module(layer)
        for name, module in layer_module.named_modules():
            if isinstance(module, nn.LayerNorm):
                builder.norm(f"{layer}.{name}", residual)
        residual.activations.append(ActivationRef(layer))

    final_norm = getattr(base, "layernorm", None)
    if isinstance(final_norm, nn.LayerNorm):
        builder.norm(f"{p}layernorm", residual)
        residual.activations.append(ActivationRef(f"{p}layernorm"))
    pooled = residual
    if isinstance(getattr(getattr(base, "pooler", None), "dense", None), nn.Linear):
        pooled = builder.plain("pooler", base.pooler.dense.out_features)
        builder.linear(f"{p}pooler.dense", residual, pooled)
        pooled.activations.append(ActivationRef(f"{p}pooler.dense"))

    heads = [] if base is model else [(n, m) for n, m in model.named_children() if m is not base]
    for name, head in heads:
        if isinstance(head, nn.Linear):  # classifier, qa_outputs
            builder.linear(name, pooled if name == "classifier" else residual, None)
        elif (isinstance(getattr(head, "dense", None), nn.Linear)
              and isinstance(getattr(head, "out_proj", None), nn.Linear)):
            inner = builder.plain(name, head.dense.out_features)  # RoBERTa's classification head
            builder.linear(f"{name}.dense", residual, inner)
            builder.linear(f"{name}.out_proj", inner, None)
            inner.activations.append(ActivationRef(f"{name}.dense"))
    return builder.finish()
