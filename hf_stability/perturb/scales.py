"""Per-tensor noise scales s_p: the std each tensor's own initialiser draws from.

transformers models draw every weight matrix and embedding from N(0, initializer_range)
(LayerNorm weights start at 1 and biases at 0: they take their module's weight std, which is
initializer_range too). timm models draw from trunc_normal(std=0.02). Plain torch layers use
PyTorch's defaults: Linear/Conv weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std
1/sqrt(3 fan_in); Embedding N(0, 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UnknownInitScaleError

TIMM_INIT_STD = 0.02
_TRANSFORMERS_STD_ATTRIBUTES = ("initializer_range", "init_std")


def _transformers_init_std(model: nn.Module) -> float | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    for attribute in _TRANSFORMERS_STD_ATTRIBUTES:
        value = getattr(config, attribute, None)
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return None


def _is_timm_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def _torch_default_std(module: nn.Module) -> float | None:
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        weight = module.weight
        fan_in = weight.shape[1] * math.prod(weight.shape[2:]) if weight.dim() > 1 else weight.shape[0]
        return 1.0 / math.sqrt(3.0 * fan_in)
    if isinstance(module, nn.Embedding):
        return 1.0
    return None


def _adapter_std(model: nn.Module, name: str) -> float | None:
    """The init std of a PEFT adapter tensor, None for any other tensor.

    LoRA's A starts as PyTorch's Linear (kaiming uniform, std 1/sqrt(3 fan_in)) or, with
    ``init_lora_weights="gaussian"``, N(0, 1/r). LoRA's B starts at zero, so its own init std is
    0: its scale is taken as its A's, so that an init-scale perturbation moves both factors of
    the update alike. IA3's vectors start at 1: their scale is 1.
    """
    if ".lora_B." in name:
        return _adapter_std(model, name.replace(".lora_B.", ".lora_A."))
    if ".ia3_l." in name:
        return 1.0
    if ".lora_A." not in name:
        return None
    module_name, _, _ = name.rpartition(".")
    layer_name, _, adapter = module_name.partition(".lora_A.")
    config = getattr(model, "peft_config", {}).get(adapter)
    if getattr(config, "init_lora_weights", True) == "gaussian":
        return 1.0 / float(model.get_submodule(layer_name).r[adapter])
    weight = model.get_submodule(module_name).weight
    return 1.0 / math.sqrt(3.0 * weight.shape[1])


def init_scales(model: nn.Module, names: list[str]) -> dict[str, float]:
    """The initialiser std of each named parameter (see the module docstring; PEFT adapters:
    ``_adapter_std``)."""
    adapters = {name: _adapter_std(model, name) for name in names}
    model_std = _transformers_init_std(model)
    if model_std is None and _is_timm_model(model):
        model_std = TIMM_INIT_STD
    if model_std is not None:
        return {name: adapters[name] if adapters[name] is not None else model_std for name in names}

    scales: dict[str, float] = {}
    for name in names:
        if adapters[name] is not None:
            scales[name] = adapters[name]
            continue
        module_name = name.rpartition(".")[0]
        module = model.get_submodule(module_name) if module_name else model
        std = _torch_default_std(module)
        if std is None:
            raise UnknownInitScaleError(
                f"Cannot tell the initialiser std of parameter {name!r} ({type(module).__name__}) of a "
                f"{type(model).__name__}: it is neither a transformers model with config.initializer_range, "
                "nor a timm model, nor a plain Linear/Conv/Embedding. Use scale_mode='param' (std of the "
                "current tensor) or scale_mode='absolute', or exclude it with an exclude pattern."
            )
        scales[name] = std
    return scales


def param_scales(named: dict[str, torch.Tensor]) -> dict[str, float]:
    """The std of each tensor's current values (population std; 0 for one entry)."""
    return {name: float(t.detach().double().std(correction=0)) for name, t in named.items()}
