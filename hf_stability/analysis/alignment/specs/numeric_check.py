"""Check a permutation spec on its model once: a random permutation applied to the model's own
weights must keep its outputs (those that carry hidden units, such as a base model's
``last_hidden_state``, permuted with them). A wrong rule is then a clear error naming the
family, never a silently wrong alignment.

The check permutes the model in place, runs one forward pass on a small random input, and
permutes it back (index gathers only: the weights come back bitwise). It is cached per class,
shapes and dtype, so a study's pairs are checked once.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn

from ....errors import UnsupportedArchitectureError
from ....hints import setting
from ..spec import PermutationSpec

logger = logging.getLogger(__name__)
_CHECKED: set[tuple] = set()
_SKIPPED_OUTPUTS = ("hidden_states", "attentions", "past_key_values", "reshaped_hidden_states", "loss")


def probe_inputs(model: nn.Module) -> dict[str, Any] | torch.Tensor | None:
    """A small random input the model accepts: token ids, pixels or a feature vector."""
    generator = torch.Generator().manual_seed(0)
    config = getattr(model, "config", None)
    try:
        accepted = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepted = {}
    vocab = getattr(config, "vocab_size", None)
    if "input_ids" in accepted and isinstance(vocab, int):
        shape = (2, 2, 7) if type(model).__name__.endswith("MultipleChoice") else (2, 7)
        inputs: dict[str, Any] = {"input_ids": torch.randint(0, vocab, shape, generator=generator)}
        if "attention_mask" in accepted:
            mask = torch.ones(shape, dtype=torch.long)
            mask[1, ..., 5:] = 0
            inputs["attention_mask"] = mask
        if "use_cache" in accepted:
            inputs["use_cache"] = False
        return inputs
    if "pixel_values" in accepted and config is not None:
        vision = getattr(config, "vision_config", None) or config  # CLIP's and SigLIP's composite configs
        size = getattr(vision, "image_size", 32)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return {"pixel_values": torch.randn(2, getattr(vision, "num_channels", 3), *size, generator=generator)}
    image = getattr(getattr(model, "patch_embed", None), "img_size", None)  # timm
    if image is not None:
        channels = model.patch_embed.proj.in_channels
        return torch.randn(2, channels, *tuple(image), generator=generator)
    first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    return None if first is None else torch.randn(2, first.in_features, generator=generator)


def _outputs(model: nn.Module, inputs: Any) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    if isinstance(inputs, dict):
        out = model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()})
    else:
        out = model(inputs.to(device, next(model.parameters()).dtype))
    if torch.is_tensor(out):
        return {"output": out}
    items = out.items() if hasattr(out, "items") else enumerate(out)
    return {str(k): v for k, v in items if torch.is_tensor(v) and str(k) not in _SKIPPED_OUTPUTS}


@torch.no_grad()
def check_spec(model: nn.Module, spec: PermutationSpec, family: str) -> None:
    """Raise UnsupportedArchitectureError unless a random permutation keeps ``model``'s outputs."""
    from ..permute import apply_permutation, random_permutation

    params = list(model.parameters())
    if not params or any(p.is_meta for p in params):
        return
    dtype = params[0].dtype
    key = (type(model).__qualname__, tuple(sorted(spec.shapes.items())), dtype, spec.architecture)
    if key in _CHECKED:
        return
    inputs = probe_inputs(model)
    if inputs is None:
        logger.warning("The %s permutation spec could not be checked numerically: no input is known for %s.",
                       spec.architecture, type(model).__name__)
        return
    perm = random_permutation(spec, torch.Generator().manual_seed(0))
    inverse = {name: torch.argsort(p) for name, p in perm.items()}
    was_training = model.training
    model.eval()
    try:
        try:
            before = _outputs(model, inputs)
        except Exception as error:  # the probe input, not the spec, is wrong for this model
            logger.warning("The %s permutation spec could not be checked numerically: %s does not accept a "
                           "random probe input (%s).", spec.architecture, type(model).__name__, error)
            return
        apply_permutation(model, perm, spec, in_place=True)
        try:
            after = _outputs(model, inputs)
        finally:
            apply_permutation(model, inverse, spec, in_place=True)
    finally:
        model.train(was_training)
    tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
    for field, expected in before.items():
        if field in spec.outputs and expected.dim() >= 1:
            slot = spec.slots[spec.outputs[field]]
            if expected.shape[-1] == slot.size:
                expected = expected.index_select(-1, perm[slot.name].to(expected.device))
        got = after[field]
        scale = float(expected.abs().max()) + 1.0
        error = float((got.float() - expected.float()).abs().max()) if got.shape == expected.shape else float("inf")
        if not error <= tolerance * scale:
            raise UnsupportedArchitectureError(
                f"The permutation spec derived for {spec.architecture} ({family}) does not keep the model's "
                f"{field!r} (largest change {error:.3g} after a random permutation): this variant has a part the "
                f"rules do not describe. Analyse with {setting('alignment', 'none')}, and please report the model "
                "type.")
    _CHECKED.add(key)
