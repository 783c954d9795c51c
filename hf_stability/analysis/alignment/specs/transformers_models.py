"""transformers models built from the common parts (common_parts.py): encoders, vision
transformers and decoders, with the heads of their ``AutoModelFor...`` classes.

Tested families (tests/test_alignment_families.py): BERT, RoBERTa, XLM-R, CamemBERT,
DistilBERT, ELECTRA (either embedding size), ALBERT (one permutation per shared layer),
DeBERTa-v2/v3, ModernBERT, ViT, DeiT, BEiT, DINOv2, CLIP and SigLIP vision towers, GPT-2, and
the Llama family (Llama, Mistral, Qwen2, Gemma). Other models of the same parts are derived the
same way and checked numerically before use; Swin has its own file (stages of several widths).
"""

from __future__ import annotations

from torch import nn

from ..spec import PermutationSpec
from .common_parts import derive_model, find_blocks
from .registry import register_spec

BERT_LAYOUT_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")


def _matches(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "base_model") and bool(find_blocks(model))


@register_spec(
    "transformers models built from common parts: BERT, RoBERTa, XLM-R, CamemBERT, DistilBERT, ELECTRA, ALBERT, "
    "DeBERTa-v2/v3, ModernBERT, ViT, DeiT, BEiT, DINOv2, CLIP/SigLIP vision, GPT-2, Llama, Mistral, Qwen2, Gemma "
    "(the base model and its task heads)",
    _matches,
)
def transformers_spec(model: nn.Module) -> PermutationSpec:
    model_type = getattr(model.config, "model_type", None)
    builder, outputs = derive_model(model, f"{type(model).__name__} ({model_type})")
    return builder.finish(outputs)
