"""permutation_spec(model): the PermutationSpec of a supported architecture, derived from the
model's config and module names (sizes are read from the modules, never written down).

Supported:
- transformers BERT-layout encoders, config.model_type in BERT_LAYOUT_TYPES, as the base model
  or with a sequence / token / question-answering / multiple-choice classification head;
- transformers ViT (ViTModel, ViTForImageClassification);
- timm VisionTransformer (fused qkv; class and register tokens; LayerScale).

Anything else (another head, relative position embeddings, qk-norm...) leaves a parameter that
no rule covers, and the derivation stops with an error naming it.
"""

from __future__ import annotations

from torch import nn

from ...errors import UnsupportedArchitectureError
from .spec import ActivationRef, AxisRef, PermutationGroup, PermutationSpec, Slot

BERT_LAYOUT_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")
SUPPORTED = (
    "transformers encoders of BERT layout (model_type " + ", ".join(BERT_LAYOUT_TYPES) + "; the base model or "
    "...ForSequenceClassification, ...ForTokenClassification, ...ForQuestionAnswering, ...ForMultipleChoice), "
    "transformers ViT (ViTModel, ViTForImageClassification), timm VisionTransformer"
)

# Module names of each role inside one encoder layer, across transformers versions.
_ROLES = {
    "query": ("attention.self.query", "attention.attention.query", "attention.q_proj"),
    "key": ("attention.self.key", "attention.attention.key", "attention.k_proj"),
    "value": ("attention.self.value", "attention.attention.value", "attention.v_proj"),
    "attention_out": ("attention.output.dense", "attention.o_proj"),
    "ffn_in": ("intermediate.dense", "mlp.fc1"),
    "ffn_out": ("output.dense", "mlp.fc2"),
}


class _Builder:
    """Collects slots and checks that every floating parameter of the model is covered."""

    def __init__(self, model: nn.Module, architecture: str):
        self.model = model
        self.architecture = architecture
        self.params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
        self.modules = dict(model.named_modules())
        self.groups: list[PermutationGroup] = []
        self.covered: set[str] = set()

    def plain(self, name: str, size: int) -> Slot:
        slot = Slot(name, size)
        self.groups.append(PermutationGroup(name, [slot]))
        return slot

    def heads(self, name: str, size: int, num_heads: int) -> tuple[Slot, Slot]:
        if num_heads < 1 or size % num_heads:
            raise UnsupportedArchitectureError(
                f"{name}: {size} attention units do not split into {num_heads} heads of equal size."
            )
        qk, v = Slot(f"{name}.qk", size), Slot(f"{name}.v", size)
        self.groups.append(PermutationGroup(name, [qk, v], num_heads=num_heads))
        return qk, v

    def axis(self, param: str, axis: int, slot: Slot, start: int = 0) -> None:
        if param not in self.params:
            raise UnsupportedArchitectureError(f"{self.architecture}: expected a parameter {param!r}; none exists.")
        if self.params[param].shape[axis] < start + slot.size:
            raise UnsupportedArchitectureError(
                f"{self.architecture}: {param!r} has {self.params[param].shape[axis]} entries on axis {axis}, "
                f"fewer than slot {slot.name!r} needs ({start} + {slot.size})."
            )
        slot.axes.append(AxisRef(param, axis, start))
        self.covered.add(param)

    def unpermuted(self, param: str) -> None:
        """A parameter without hidden-unit axes (a classifier's bias)."""
        if param in self.params:
            self.covered.add(param)

    def module(self, name: str) -> nn.Module | None:
        return self.modules.get(name)

    def linear(self, name: str, inputs: Slot | None, outputs: Slot | None, out_start: int = 0) -> None:
        """A Linear layer: inputs permute weight columns, outputs permute rows and the bias."""
        if inputs is not None:
            self.axis(f"{name}.weight", 1, inputs)
        if outputs is not None:
            self.axis(f"{name}.weight", 0, outputs, out_start)
            if f"{name}.bias" in self.params:
                self.axis(f"{name}.bias", 0, outputs, out_start)
        else:
            self.covered.add(f"{name}.weight")
            self.unpermuted(f"{name}.bias")

    def norm(self, name: str, slot: Slot) -> None:
        """A LayerNorm over the slot's units (permutation-equivariant)."""
        for suffix in ("weight", "bias"):
            if f"{name}.{suffix}" in self.params:
                self.axis(f"{name}.{suffix}", 0, slot)

    def finish(self) -> PermutationSpec:
        missing = [n for n in self.params if n not in self.covered]
        if missing:
            raise UnsupportedArchitectureError(
                f"Parameter {missing[0]!r} of this {self.architecture} is not covered by its permutation spec: this "
                f"variant is not supported. Supported: {SUPPORTED}."
            )
        shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        return PermutationSpec(self.architecture, self.groups, shapes)


def _find_role(builder: _Builder, layer: str, role: str) -> str:
    for suffix in _ROLES[role]:
        module = builder.module(f"{layer}.{suffix}")
        if isinstance(module, nn.Linear):
            return f"{layer}.{suffix}"
    raise UnsupportedArchitectureError(
        f"{builder.architecture}: layer {layer!r} has no {role} projection (looked for {', '.join(_ROLES[role])}). "
        f"Supported: {SUPPORTED}."
    )


def _encoder_layers(base: nn.Module) -> tuple[str, int]:
    for prefix, holder in (("encoder.layer", getattr(getattr(base, "encoder", None), "layer", None)),
                           ("layers", getattr(base, "layers", None))):
        if isinstance(holder, nn.ModuleList):
            return prefix, len(holder)
    raise UnsupportedArchitectureError(f"{type(base).__name__} has no encoder.layer or layers list. Supported: {SUPPORTED}.")


def _embeddings(builder: _Builder, prefix: str, residual: Slot) -> None:
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


def _transformers_spec(model: nn.Module) -> PermutationSpec:
    config = model.config
    builder = _Builder(model, f"{type(model).__name__} (model_type {config.model_type})")
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
        elif isinstance(getattr(head, "dense", None), nn.Linear) and isinstance(getattr(head, "out_proj", None), nn.Linear):
            inner = builder.plain(name, head.dense.out_features)  # RoBERTa's classification head
            builder.linear(f"{name}.dense", residual, inner)
            builder.linear(f"{name}.out_proj", inner, None)
            inner.activations.append(ActivationRef(f"{name}.dense"))
    return builder.finish()


def _is_timm_vision_transformer(model: nn.Module) -> bool:
    return any(
        cls.__name__ == "VisionTransformer" and cls.__module__.startswith("timm.") for cls in type(model).__mro__
    )


def _timm_vit_spec(model: nn.Module) -> PermutationSpec:
    builder = _Builder(model, f"timm {type(model).__name__}")
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


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """The PermutationSpec of ``model``'s architecture; raises UnsupportedArchitectureError listing
    the supported ones otherwise."""
    if _is_timm_vision_transformer(model):
        return _timm_vit_spec(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in BERT_LAYOUT_TYPES or model_type == "vit":
        if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
            raise UnsupportedArchitectureError(
                f"position_embedding_type={config.position_embedding_type!r} ties query dimensions across heads; "
                "only absolute position embeddings are supported."
            )
        return _transformers_spec(model)
    raise UnsupportedArchitectureError(
        f"No permutation spec for {type(model).__name__}"
        + (f" (model_type {model_type!r})" if model_type else "")
        + f". Supported: {SUPPORTED}. Run the analyzer with --alignment none to skip alignment."
    )
