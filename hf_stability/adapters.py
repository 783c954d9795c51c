"""PEFT adapters as every stage sees them, without importing peft unless a model is one.

A PEFT study trains only the adapter (LoRA's A and B, IA3's vectors, and the ``modules_to_save``
such as a new classifier); its checkpoints and final/ folders hold only those tensors, and the
frozen base model is saved once in RUN/base_model.
"""

from __future__ import annotations

import torch
from torch import nn

#: The prefix PEFT puts before the base model's own parameter names.
PEFT_PREFIX = "base_model.model."


def is_peft_model(model: nn.Module | None) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (checked by class, so peft need not be installed)."""
    return any(cls.__name__ == "PeftModel" and cls.__module__.startswith("peft.") for cls in type(model).__mro__)


def base_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model (the model itself otherwise)."""
    return model.get_base_model() if is_peft_model(model) else model


def adapter_type(model: nn.Module) -> str:
    """The adapter's PEFT type ("LORA", "IA3", ...)."""
    config = next(iter(model.peft_config.values()))
    return str(getattr(config.peft_type, "value", config.peft_type))


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter checkpoint holds (what a PEFT study trains), by the names of the
    parameters they are, without PEFT's prefix: ``bert.encoder.layer.0.attention.self.query.lora_A.default.weight``."""
    from peft import get_peft_model_state_dict

    saved = {t.data_ptr() for t in get_peft_model_state_dict(model).values()}
    return {name.removeprefix(PEFT_PREFIX): p for name, p in model.named_parameters()
            if p.is_floating_point() and p.data_ptr() in saved}
