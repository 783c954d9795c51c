"""Transformers built from the common parts, derived from the module tree without a table per
model: a residual stream written by embeddings and read by heads, and blocks of one attention
(separate or fused query/key/value projections, grouped-query heads, rotary dimensions,
per-head relative position tables) and one MLP (plain or gated, fused or not), with LayerNorm
or RMSNorm and layer scales over the residual stream.

The roles of linear layers come from the ends of their names (``ROLES``), so that BERT's
``attention.self.query``, Llama's ``self_attn.q_proj``, GPT-2's fused ``attn.c_attn`` and
ModernBERT's ``attn.Wqkv`` all read as the same part. A block is the smallest module that holds
a query (or fused) projection and an MLP output projection. Any parameter that no rule covers
stops the derivation with an error naming it; ``permutation_spec`` then checks the spec
numerically on the model (``numeric_check.py``).
"""

from __future__ import annotations

from torch import nn

from ....errors import UnsupportedArchitectureError
from ..spec import ActivationRef, Slot
from .builder import AttentionSlots, SpecBuilder

# role -> ends of module names, longest first where one name ends another.
ROLES: dict[str, tuple[str, ...]] = {
    "attention_out": ("attention.output.dense", "attention.dense", "attn.c_proj", "attn.Wo", "attn.proj",
                      "o_proj", "out_proj", "out_lin"),
    "query": ("q_proj", "query", "q_lin", "query_proj"),
    "key": ("k_proj", "key", "k_lin", "key_proj"),
    "value": ("v_proj", "value", "v_lin", "value_proj"),
    "qkv": ("c_attn", "Wqkv", "qkv_proj", "qkv"),
    "position_qk": ("pos_key_proj", "pos_query_proj"),
    "mlp_gate": ("gate_proj",),
    "mlp_out": ("output.dense", "mlp.c_proj", "mlp.Wo", "down_proj", "ffn_output", "fc2", "lin2", "weights_out"),
    "mlp_in": ("intermediate.dense", "c_fc", "mlp.Wi", "up_proj", "ffn", "fc1", "lin1", "weights_in"),
}
# Heads that transform the residual stream into units of their own before a readout.
TRANSFORMS = ("pooler.dense", "pooler", "pre_classifier", "head.dense", "classifier.dense", "sequence_summary.summary",
              "transform.dense", "vocab_transform", "lm_head.dense", "generator_predictions.dense",
              "predictions.dense")
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("Norm", "RMSNorm"))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]


def role(name: str, module: nn.Module) -> str | None:
    """The role of a linear module (or of nn.MultiheadAttention, a fused qkv) from its name."""
    if isinstance(module, nn.MultiheadAttention):
        return "qkv"
    if not is_linear(module):
        return None
    for kind, ends in ROLES.items():
        if any(name == end or name.endswith("." + end) for end in ends):
            return kind
    return None


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks: the smallest modules holding an attention projection and an MLP output."""
    roles = {name: role(name, m) for name, m in model.named_modules()}
    attention = [n for n, r in roles.items() if r in ("query", "qkv")]
    outputs = {n for n, r in roles.items() if r == "mlp_out"}
    blocks: list[str] = []
    for name in attention:
        parts = name.split(".")
        for depth in range(len(parts) - 1, -1, -1):
            prefix = ".".join(parts[:depth])
            if any(o.startswith(prefix + ".") or (not prefix and o) for o in outputs):
                if prefix not in blocks:
                    blocks.append(prefix)
                break
    return blocks


def _under(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


def _head_count(attention_modules: list[nn.Module], config) -> tuple[int | None, int | None]:
    """(head_dim, num_heads) declared by the attention modules or the config, where they are."""
    head_dim = num_heads = None
    for module in attention_modules:
        head_dim = head_dim or getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
        for attr in HEAD_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and num_heads is None:
                num_heads = value
    if num_heads is None and head_dim is None:
        value = getattr(config, "num_attention_heads", None)
        num_heads = value if isinstance(value, int) else None
    return head_dim, num_heads


def rotary_dims(model: nn.Module, head_dim: int) -> int:
    """How many query/key dimensions per head rotary position embeddings rotate (0 without)."""
    if not any("Rotary" in type(m).__name__ for m in model.modules()):
        return 0
    config = getattr(model, "config", None)
    factor = getattr(config, "partial_rotary_factor", None) or 1.0
    return int(head_dim * factor)


def derive_block(builder: SpecBuilder, block: str, residual: Slot, rotary: bool = True) -> None:
    """The rules of one block: attention, MLP, norms and layer scales over ``residual``."""
    model, hidden = builder.model, residual.size
    modules = {n: m for n, m in builder.modules.items() if _under(n, block) and n != block}
    by_role: dict[str, list[str]] = {}
    for name, module in modules.items():
        kind = role(name, module)
        if kind:
            by_role.setdefault(kind, []).append(name)
    fused = by_role.get("qkv", [])
    separate = [by_role.get(k, []) for k in ("query", "key", "value")]
    if len(fused) + len(separate[0]) != 1 or (not fused and not all(len(s) == 1 for s in separate)):
        raise UnsupportedArchitectureError(
            f"{builder.architecture}: block {block!r} does not hold exactly one self-attention (found query "
            f"projections {separate[0] + fused}); cross-attention and several attentions per block are not derived."
        )
    names = [n for group in (fused, *separate) for n in group]
    attention_parent = names[0].rsplit(".", 1)[0] if "." in names[0] else ""
    holders = [builder.modules[n] for n in names] + [builder.modules.get(attention_parent)]
    holders += [m for n, m in modules.items() if _under(n, attention_parent) and not is_linear(m)]
    head_dim, num_heads = _head_count([m for m in holders if m is not None], getattr(model, "config", None))
    if fused:
        module = builder.modules[fused[0]]
        if isinstance(module, nn.MultiheadAttention):
            q_out = k_out = v_out = module.embed_dim
            num_heads, head_dim = module.num_heads, module.head_dim
        else:
            q_out = k_out = v_out = linear_shape(module)[1] // 3
    else:
        q_out, k_out, v_out = (linear_shape(builder.modules[s[0]])[1] for s in separate)
    head_dim = head_dim or (q_out // num_heads if num_heads else None)
    if not head_dim or q_out % head_dim or k_out % head_dim:
        raise UnsupportedArchitectureError(
            f"{builder.architecture}: cannot tell the head size of {attention_parent!r} ({q_out} query units); "
            "set num_attention_heads in the config or head_dim on the attention module."
        )
    heads, kv_heads = q_out // head_dim, k_out // head_dim
    head_norms = [n for n, m in modules.items() if is_norm(m) and getattr(m, "weight", None) is not None
                  and m.weight.shape == (head_dim,) and _under(n, attention_parent)]
    fixed = head_dim if head_norms else (rotary_dims(model, head_dim) if rotary else 0)
    tables = [f"{n}.relative_position_bias_table" for n in (*modules, attention_parent)
              if f"{n}.relative_position_bias_table" in builder.params]
    tables = list(dict.fromkeys(tables))
    slots: AttentionSlots = builder.attention(
        f"{block}.attention", heads, kv_heads, head_dim, v_out // kv_heads, fixed_qk=fixed, head_table=bool(tables))
    if fused and isinstance(builder.modules[fused[0]], nn.MultiheadAttention):
        prefix = f"{fused[0]}.in_proj_"
        for start, slot in ((0, slots.q), (q_out, slots.k), (2 * q_out, slots.v)):
            builder.axis(prefix + "weight", 0, slot, start)
            if prefix + "bias" in builder.params:
                builder.axis(prefix + "bias", 0, slot, start)
        builder.axis(prefix + "weight", 1, residual)
    elif fused:
        builder.linear(fused[0], residual, slots.q, out_start=0)
        builder.linear(fused[0], None, slots.k, out_start=q_out)
        builder.linear(fused[0], None, slots.v, out_start=q_out + k_out)
        slots.q.activations.append(ActivationRef(fused[0], 0))
        slots.k.activations.append(ActivationRef(fused[0], q_out))
        slots.v.activations.append(ActivationRef(fused[0], q_out + k_out))
    else:
        for name, slot in zip((s[0] for s in separate), (slots.q, slots.k, slots.v)):
            builder.linear(name, residual, slot)
            slot.activations.append(ActivationRef(name))
    for name in by_role.get("position_qk", []):
        if slots.q is not slots.k:
            raise UnsupportedArchitectureError(f"{builder.architecture}: {name!r} with grouped-query heads.")
        builder.linear(name, residual, slots.k)
    outs = by_role.get("attention_out", [])
    if len(outs) != 1:
        raise UnsupportedArchitectureError(
            f"{builder.architecture}: block {block!r} has {len(outs)} attention output projections ({outs}).")
    builder.linear(outs[0], slots.o, residual)
    for table in tables:
        builder.axis(table, 1, slots.head)
    for norm in head_norms:
        builder.unpermuted(f"{norm}.weight")
        builder.unpermuted(f"{norm}.bias")

    mlp_out = by_role.get("mlp_out", [])
    mlp_in = by_role.get("mlp_in", []) + by_role.get("mlp_gate", [])
    if len(mlp_out) != 1 or not 1 <= len(mlp_in) <= 2:
        raise UnsupportedArchitectureError(
            f"{builder.architecture}: block {block!r} has MLP projections {mlp_in} -> {mlp_out}; one plain or gated "
            "MLP is derived.")
    units = linear_shape(builder.modules[mlp_out[0]])[0]
    ffn = builder.plain(f"{block}.ffn", units)
    for name in mlp_in:
        out_features = linear_shape(builder.modules[name])[1]
        if out_features not in (units, 2 * units):
            raise UnsupportedArchitectureError(
                f"{builder.architecture}: {name!r} has {out_features} outputs for an MLP of {units} units.")
        for start in range(0, out_features, units):  # a fused gated MLP: [input; gate]
            builder.linear(name, residual if start == 0 else None, ffn, out_start=start)
    builder.linear(mlp_out[0], ffn, residual)
    ffn.activations.append(ActivationRef(mlp_in[0]))

    for name, module in modules.items():  # norms over the residual stream, layer scales
        if is_norm(module) and name not in head_norms:
            builder.norm(name, residual)
    for name, param in builder.params.items():  # layer scales, a pooling head's probe token
        if _under(name, block) and name not in builder.covered and _on_last_axis(param.shape, hidden):
            builder.axis(name, param.dim() - 1, residual)
    if block:
        residual.activations.append(ActivationRef(block))


def _on_last_axis(shape: tuple[int, ...], size: int) -> bool:
    """A vector of ``size`` units, possibly with leading axes of one (tokens, scales)."""
    return len(shape) >= 1 and shape[-1] == size and all(d == 1 for d in shape[:-1])


def hidden_size(model: nn.Module, blocks: list[str]) -> int:
    """The config's hidden size, else (a composite config, such as CLIP's) the width the first
    block's attention reads."""
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "dim", "d_model", "embed_dim"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    for name, module in model.named_modules():
        if _under(name, blocks[0]) and role(name, module) in ("query", "qkv"):
            return module.embed_dim if isinstance(module, nn.MultiheadAttention) else linear_shape(module)[0]
    raise UnsupportedArchitectureError(f"{type(model).__name__}: its config names no hidden size.")


def derive_model(model: nn.Module, architecture: str) -> tuple[SpecBuilder, dict[str, str]]:
    """A builder covering ``model`` (one residual stream of the config's hidden size) and the
    outputs that carry hidden units; the caller finishes it."""
    builder = SpecBuilder(model, architecture)
    blocks = find_blocks(model)
    if not blocks:
        raise UnsupportedArchitectureError(f"{architecture}: no attention block with an MLP was found.")
    hidden = hidden_size(model, blocks)
    config = getattr(model, "config", None)
    embedding = getattr(config, "embedding_size", None)
    residual = builder.plain("residual", hidden)
    stream = builder.plain("embedding", embedding) if isinstance(embedding, int) and embedding != hidden else None

    def inside_blocks(name: str) -> bool:
        return any(_under(name, b) for b in blocks)

    outside = [(n, m) for n, m in builder.modules.items() if not inside_blocks(n)]
    transforms = [n for n, m in outside if is_linear(m) and any(n == t or n.endswith("." + t) for t in TRANSFORMS)
                  and linear_shape(m)[0] == hidden]
    if len(transforms) > 1:
        raise UnsupportedArchitectureError(f"{architecture}: several head transforms ({transforms}) are not derived.")
    def reads(module: nn.Module) -> bool:  # the stream (or copies of it), or the embedding stream into a vocabulary
        width, out = linear_shape(module)
        return width % hidden == 0 or (stream is not None and width == stream.size and out != hidden)

    readouts = [n for n, m in outside if is_linear(m) and n not in transforms and reads(m)]
    tied = [n for n in readouts if f"{n}.weight" not in builder.params]
    readout_biases = {id(builder.modules[n].bias) for n in readouts
                      if getattr(builder.modules[n], "bias", None) is not None}
    head_units = residual
    if transforms and tied:  # a decoder tied to the embeddings: the transform writes their stream
        width = linear_shape(builder.modules[transforms[0]])[1]
        head_units = stream if stream is not None and width == stream.size else residual
    elif transforms:
        head_units = builder.plain(transforms[0].rsplit(".", 1)[0] if "." in transforms[0] else transforms[0],
                                   linear_shape(builder.modules[transforms[0]])[1])
        head_units.activations.append(ActivationRef(transforms[0]))

    def parent(name: str) -> str:
        return name.rsplit(".", 1)[0] if "." in name else ""

    for name, module in outside:
        if name in transforms:
            builder.linear(name, residual, head_units)
        elif name in readouts:
            width = linear_shape(module)[0]
            if f"{name}.weight" in builder.params:  # else tied to the embeddings, already covered
                for start in range(0, width, head_units.size):
                    builder.linear(name, head_units, None, in_start=start)
            builder.unpermuted(f"{name}.bias")
        elif is_linear(module) and stream is not None and linear_shape(module) == (stream.size, hidden):
            builder.linear(name, stream, residual)  # the embedding projection
            residual.activations.insert(0, ActivationRef(name))
        elif isinstance(module, nn.Embedding) or is_norm(module) or isinstance(module, nn.Conv2d):
            width = module.weight.shape[1] if isinstance(module, nn.Embedding) else (
                module.out_channels if isinstance(module, nn.Conv2d) else module.weight.shape[0])
            beside_transform = bool(transforms) and is_norm(module) and parent(name) == parent(transforms[0])
            slot = {hidden: head_units if beside_transform else residual}.get(width)
            if slot is None and stream is not None and width == stream.size:
                slot = stream
            if slot is None:
                continue  # left uncovered: finish() names it
            if isinstance(module, nn.Embedding):
                builder.axis(f"{name}.weight", 1, slot)
            elif isinstance(module, nn.Conv2d):
                builder.linear(name, None, slot)
            else:
                builder.norm(name, slot)
                if slot is not head_units or head_units is residual:
                    slot.activations.append(ActivationRef(name))
        for pname, param in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if full in builder.covered or not param.is_floating_point():
                continue
            if id(param) in readout_biases:  # a readout's bias registered on its parent (BERT's MLM head)
                builder.unpermuted(full)
                continue
            for slot in (residual, stream):
                if slot is not None and param.shape[-1:] == (slot.size,) and not is_linear(module):
                    builder.axis(full, param.dim() - 1, slot)  # class, distillation and mask tokens, positions
                    break
    entry = [n for n, m in outside if n.endswith("embeddings") and not isinstance(m, nn.Embedding)]
    if entry and stream is None:  # the embeddings' output is the residual stream
        residual.activations.insert(0, ActivationRef(entry[0]))
    for block in blocks:
        derive_block(builder, block, residual)
    outputs = {"last_hidden_state": residual.name, "pooler_output": head_units.name}
    return builder, outputs
