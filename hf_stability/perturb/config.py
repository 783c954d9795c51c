"""PerturbationConfig: what a perturbation is, validated on construction."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..enums import ExplicitEnum, plain
from ..errors import PerturbationConfigError


class PerturbationKind(ExplicitEnum):
    """What a perturbation changes at the spawn step."""

    __label__ = "perturbation kind"
    __error__ = PerturbationConfigError
    NONE = "none"  # the control: nothing changes
    GAUSSIAN = "gaussian"  # noise on the weights
    BATCH = "batch"  # a step along the loss gradient of an independent batch
    DATA_ORDER = "data_order"  # another data order after the spawn step
    DROPOUT = "dropout"  # another dropout seed after the spawn step
    SINGLE_WEIGHT = "single_weight"  # one weight moved by exactly scale * s_p (random sign)
    INIT_SEED = "init_seed"  # the weights of another initialisation (model_init under another seed), at step 0


class ScaleMode(ExplicitEnum):
    """What s_p, the scale of tensor p's noise, is."""

    __label__ = "scale_mode"
    __error__ = PerturbationConfigError
    INIT = "init"  # the std the model's initialiser draws p from
    PARAM = "param"  # the std of p now
    ABSOLUTE = "absolute"  # 1


#: Kinds that change the weights once, at the spawn step, by ``scale`` (0: the control).
WEIGHT_KINDS = (PerturbationKind.GAUSSIAN, PerturbationKind.BATCH, PerturbationKind.SINGLE_WEIGHT)
#: Kinds that change the randomness after the spawn step (the SGD-noise baselines).
RNG_KINDS = (PerturbationKind.DATA_ORDER, PerturbationKind.DROPOUT)
#: The randomness every user already knows, as reference bands for the perturbations: another
#: initialisation (same data order) and another data order (same initialisation).
REFERENCE_KINDS = (PerturbationKind.INIT_SEED, PerturbationKind.DATA_ORDER)
KINDS = tuple(PerturbationKind.values())
SCALE_MODES = tuple(ScaleMode.values())


@dataclass
class PerturbationConfig:
    """One perturbation, applied once at the spawn step.

    The noise of parameter tensor ``p`` is ``scale * s_p * eps_p`` where ``s_p`` follows
    ``scale_mode`` (``init``: the std the model's initialiser draws ``p`` from; ``param``:
    the std of ``p`` now; ``absolute``: 1) and ``eps_p`` is standard normal noise
    (kind ``gaussian``) or the normalised loss gradient on an independent batch (kind
    ``batch``). Kind ``single_weight`` moves one entry, drawn uniformly from the selected ones,
    by exactly ``scale * s_p`` with a random sign (the paper's smallest perturbation, its size in
    units of the init scale). Kinds ``data_order`` and ``dropout`` change no weight: after the
    spawn step the run uses another data order or dropout seed. Kind ``init_seed`` (spawn step 0
    only) replaces the selected weights by those ``model_init`` builds under another seed: an
    independently initialised run with the same data order. Kind ``none`` is the control.
    ``trainable_only``: touch only parameters that train (a frozen weight perturbed would never
    train again, and a PEFT adapter's checkpoints do not even save it).
    """

    kind: PerturbationKind = PerturbationKind.GAUSSIAN
    scale: float = 0.01
    scale_mode: ScaleMode = ScaleMode.INIT
    normalize: bool = False
    fraction: float | None = None
    num_entries: int | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    seed: int = 0
    batch_size: int = 32
    trainable_only: bool = True

    def __post_init__(self) -> None:
        self.kind, self.scale_mode = PerturbationKind(self.kind), ScaleMode(self.scale_mode)
        try:
            self.scale = float(self.scale)
        except (TypeError, ValueError):
            raise PerturbationConfigError(f"Perturbation scale must be a number, got {self.scale!r}.") from None
        if math.isnan(self.scale) or math.isinf(self.scale) or self.scale < 0:
            raise PerturbationConfigError(
                f"Perturbation scale must be a finite number >= 0, got {self.scale}. "
                "Use 0 for a control child and a small positive value (for example 0.01) otherwise."
            )
        if self.fraction is not None and self.num_entries is not None:
            raise PerturbationConfigError(
                "Give either fraction or num_entries, not both: fraction perturbs that share of the selected "
                "entries, num_entries exactly that many."
            )
        if self.fraction is not None and not (0.0 < float(self.fraction) <= 1.0):
            raise PerturbationConfigError(f"fraction must lie in (0, 1], got {self.fraction}.")
        if self.num_entries is not None and int(self.num_entries) < 1:
            raise PerturbationConfigError(
                f"num_entries must be >= 1 (1 perturbs a single weight), got {self.num_entries}."
            )
        if self.kind == PerturbationKind.SINGLE_WEIGHT and (self.fraction is not None or self.num_entries is not None
                                                            or self.normalize):
            raise PerturbationConfigError(
                "kind='single_weight' perturbs exactly one entry by scale * s_p: leave fraction, num_entries and "
                "normalize unset (kind='gaussian' with num_entries perturbs several)."
            )
        if self.batch_size < 1:
            raise PerturbationConfigError(f"batch_size must be >= 1, got {self.batch_size}.")
        self.include = list(self.include or [])
        self.exclude = list(self.exclude or [])
        for pattern in self.include + self.exclude:
            try:
                re.compile(pattern)
            except re.error as err:
                raise PerturbationConfigError(f"Invalid regular expression {pattern!r}: {err}.") from None

    @property
    def changes_weights(self) -> bool:
        """True for kinds that add noise to the weights (and a scale above zero)."""
        return self.kind in WEIGHT_KINDS and self.scale > 0

    @property
    def is_control(self) -> bool:
        return self.kind == "none" or (self.kind in WEIGHT_KINDS and self.scale == 0)

    @property
    def group(self) -> str:
        """The children of one spawn step that share this perturbation, by name: ``control``,
        ``gaussian 0.01``, ``single_weight 1``, ``init_seed``, ``data_order``... (a report's rows)."""
        if self.is_control:
            return "control"
        if self.kind in WEIGHT_KINDS:
            return f"{self.kind.value} {self.scale:g}"
        return self.kind.value

    def to_dict(self) -> dict[str, Any]:
        return plain(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PerturbationConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise PerturbationConfigError(
                f"Unknown perturbation fields {sorted(unknown)}: expected a subset of {sorted(known)}."
            )
        return cls(**data)
