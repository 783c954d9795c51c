"""Permutation alignment: relabel the hidden units of model b so that it lines up with model a
without changing the function it computes, then measure what distance and barrier remain.

- ``permutation_spec(model)``: the symmetries of transformers encoders, vision transformers
  and decoders built from common parts, Swin and timm VisionTransformer, attention heads,
  grouped-query heads and rotary dimensions included (``specs/``; ``attention_layout.py``),
  checked numerically on the model when built.
- ``random_permutation``, ``apply_permutation``, ``permute_state`` (``permute.py``).
- ``weight_matching(a, b)`` and ``activation_matching(a, b, spec, data)``, each returning a
  ``MatchingResult`` whose ``permutation`` goes to ``apply_permutation(b, ...)``.
"""

from .activation_matching import activation_matching
from .assignment import MatchingResult, solve_group
from .permute import apply_permutation, identity_permutation, permute_state, permute_tensor, random_permutation
from .spec import ActivationRef, AxisRef, Permutation, PermutationGroup, PermutationSpec, Slot
from .specs import BERT_LAYOUT_TYPES, permutation_spec, register_spec, supported_architectures
from .weight_matching import objective, weight_matching

__all__ = [
    "BERT_LAYOUT_TYPES",
    "ActivationRef",
    "AxisRef",
    "MatchingResult",
    "Permutation",
    "PermutationGroup",
    "PermutationSpec",
    "Slot",
    "activation_matching",
    "apply_permutation",
    "identity_permutation",
    "objective",
    "permutation_spec",
    "permute_state",
    "permute_tensor",
    "random_permutation",
    "register_spec",
    "solve_group",
    "supported_architectures",
    "weight_matching",
]
