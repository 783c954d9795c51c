"""analysis/report.json as typed dataclasses: what the analysis writes and what the report stage
and the CLI read, by attribute (docs/report_schema.md).

``Report.to_dict()`` is the JSON layout; ``Report.from_dict(data)`` checks every field's type on
the way in (a number that is a string, a missing section) and names the field it refuses, so a
damaged or edited report is an error, never a traceback in a plot.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from ..errors import ReportError
from ..hints import setting

REPORT_SCHEMA_VERSION = 7


@dataclass
class BarrierResult:
    """``values[i]`` is the metric (lower is better) at ``alphas[i]``;
    ``barrier = max_i values[i] - ((1 - alphas[i]) endpoint_a + alphas[i] endpoint_b)``, the
    largest gap over the straight line between the endpoints; ``gap_at_peak`` the paper code's
    definition, the gap at the path's highest point (equal when the endpoints are)."""

    metric: str
    alphas: list[float]
    values: list[float]
    endpoint_a: float
    endpoint_b: float
    barrier: float
    gap_at_peak: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Distance:
    """L2 between two models: overall, relative (l2 / sqrt(||a|| ||b||)) and per layer."""

    l2: float
    relative: float
    per_layer: dict[str, float] = field(default_factory=dict)


@dataclass
class Representations:
    """Linear CKA per layer (None where a layer does not vary over the examples)."""

    pooling: str
    layers: list[str]
    values: list[float | None]


@dataclass
class Aligned:
    """The pair after permuting b's hidden units to match a."""

    method: str
    iterations: int | None
    converged: bool
    objective: float | None
    units_moved: int
    units: int
    l2: Distance
    barriers: dict[str, dict[str, BarrierResult]]


@dataclass
class FloorFigure:
    """One figure of a child beside its control's (the noise floor)."""

    value: float | None
    floor: float | None
    within: bool | None


@dataclass
class NoiseFloor:
    factor: float
    figures: dict[str, FloorFigure]
    indistinguishable: bool


@dataclass
class Pair:
    """Two compared models (parent-child or child-child) and every measure of them."""

    inputs: str
    spawn_step: int
    kind: str
    a: str
    b: str
    child: int
    is_control: bool
    perturbation_l2: float
    amplification: float | None
    l2: Distance
    barriers: dict[str, dict[str, BarrierResult]]
    cka: Representations
    disagreement: float | None
    noise_floor: NoiseFloor | None = None
    aligned: Aligned | None = None
    merged_l2: Distance | None = None  # PEFT runs: the L2 of the merged weights (``l2`` is the adapters')
    group: str = "control"  # b's perturbation (PerturbationConfig.group): "gaussian 0.01", "init_seed"...
    reference: str | None = None  # init_seed | data_order: b is a reference child
    perturbation_size: float | None = None  # parent-child: b's perturbation L2 over an initialisation's L2


@dataclass
class Stat:
    """Mean, population std and count over a spawn step's perturbed children (None: none finite)."""

    mean: float | None
    std: float | None
    n: int


@dataclass
class SpawnSummary:
    """One spawn step: the control's figures (the noise floor) and the children's statistics."""

    spawn_step: int
    num_children: int
    control: dict[str, float | None] | None
    children: dict[str, Stat]
    indistinguishable_from_floor: int | None
    group: str = "control"  # the children's perturbation; a step has one row per group
    reference: str | None = None  # init_seed | data_order: a reference band
    perturbation_size: float | None = None  # the children's mean perturbation L2 over an initialisation's L2


@dataclass
class Trajectory:
    """A child's L2 to the parent during training (its divergence.jsonl)."""

    spawn_step: int
    child: int
    is_control: bool
    perturbation_l2: float
    steps: list[int]
    l2: list[float]
    group: str = "control"
    reference: str | None = None


@dataclass
class Diverged:
    spawn_step: int
    child: int
    step: int
    reason: str


@dataclass
class RunInfo:
    fingerprint: str
    max_steps: int
    spawn_steps: list[int]
    children: list[int]
    control_child: int | None
    perturbations: dict[str, dict[str, dict[str, Any]]]
    model: str | None
    task: str
    base_model: str | None
    dataset_name: str | None
    references: dict[str, str] = field(default_factory=dict)  # c<k> -> init_seed | data_order


@dataclass
class AlignmentSettings:
    method: str  # weight | activation | none
    skipped: str | None  # why alignment was skipped (alignment "auto" on an architecture without a spec)
    seed: int | None
    samples: int | None
    architecture: str | None


@dataclass
class PeftSettings:
    """A PEFT study's analysis: its adapter type and the line its barriers follow."""

    adapter: str  # LORA, IA3...
    path: str  # adapters | merged


@dataclass
class HeadSettings:
    """How the head was measured (analysis/heads.py): its kind, its loss, and the rule that counts
    an error and a disagreement (None: the head has none, so neither is reported)."""

    name: str
    loss: str
    error: str | None
    perplexity: str | None = None  # the rule of exp(loss) for a language model; None: the head has no perplexity


@dataclass
class Settings:
    alphas: int
    train_samples: int
    eval_split: str
    eval_samples: int
    pairs: str
    pooling: str  # the tokens CKA read: cls | last | mean | all
    readout: str  # why those
    head: HeadSettings
    batch_size: int
    autocast: str
    num_processes: int
    alignment: AlignmentSettings
    peft: PeftSettings | None = None


@dataclass
class Metrics:
    loss: float
    error: float | None


@dataclass
class Report:
    """The whole of analysis/report.json."""

    schema_version: int
    generated_by: str
    inputs: dict[str, Any]
    run: RunInfo
    settings: Settings
    parent: dict[str, Metrics]
    pairs: list[Pair]
    diverged: list[Diverged]
    divergence: list[Trajectory]
    summary: list[SpawnSummary]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "report.json") -> Report:
        """The report in ``data``, every field type-checked.

        Raises:
            ReportError: a field is missing or of another type (named as a dotted path).
        """
        return _build(cls, data, "", source)

    def parent_child(self, spawn_step: int | None = None) -> list[Pair]:
        """The parent-child pairs (of one spawn step)."""
        return [p for p in self.pairs
                if p.kind == "parent-child" and (spawn_step is None or p.spawn_step == spawn_step)]

    def perturbed(self, spawn_step: int) -> list[Pair]:
        """The perturbed children of a spawn step against the parent (not the reference children)."""
        return [p for p in self.parent_child(spawn_step) if not p.is_control and p.reference is None]

    def perturbation_rows(self) -> list[SpawnSummary]:
        """The summary rows of perturbed children (one per spawn step and perturbation)."""
        return [row for row in self.summary if row.children and row.reference is None]

    def reference_rows(self, reference: str) -> list[SpawnSummary]:
        """The summary rows of one reference kind (init_seed: spawn step 0 only)."""
        return [row for row in self.summary if row.children and row.reference == reference]

    def groups(self) -> list[str]:
        """The perturbations of the study's perturbed children, in the order planned."""
        return list(dict.fromkeys(row.group for row in self.perturbation_rows()))


# ---- typed reading ---------------------------------------------------------------------------------
def _refuse(where: str, expected: str, value: Any, source: str) -> ReportError:
    shown = repr(value) if len(repr(value)) < 80 else repr(value)[:77] + "..."
    return ReportError(f"{source}: the field {where.lstrip('.') or '(top)'!r} holds {shown}, not {expected}: the file "
                       f"is incomplete, damaged or was edited. Analyse the run again with {setting('reanalyze')} to "
                       "write it again.")


def _build(kind: Any, value: Any, where: str, source: str) -> Any:
    """``value`` checked against the type ``kind`` (dataclasses, lists, dicts, unions, numbers)."""
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if origin is Union or origin is types.UnionType:
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            try:
                return _build(option, value, where, source)
            except ReportError:
                continue
        raise _refuse(where, " or ".join(_name(o) for o in options), value, source)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise _refuse(where, f"an object ({kind.__name__})", value, source)
        hints = typing.get_type_hints(kind)
        values = {}
        for f in dataclasses.fields(kind):
            if f.name not in value:
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                    continue
                raise ReportError(f"{source} lacks the field {(where + '.' + f.name).lstrip('.')!r}: the file is "
                                  f"incomplete or was edited. Analyse the run again with {setting('reanalyze')} "
                                  "to write it again.")
            values[f.name] = _build(hints[f.name], value[f.name], f"{where}.{f.name}", source)
        return kind(**values)
    if origin is list:
        (item,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise _refuse(where, "a list", value, source)
        return [_build(item, v, f"{where}.{i}", source) for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(kind)
        if not isinstance(value, dict):
            raise _refuse(where, "an object", value, source)
        return {str(k): _build(item, v, f"{where}.{k}", source) for k, v in value.items()}
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _refuse(where, "a number", value, source)
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _refuse(where, "an integer", value, source)
        return value
    if kind in (str, bool):
        if not isinstance(value, kind):
            raise _refuse(where, "a string" if kind is str else "true or false", value, source)
        return value
    raise TypeError(f"no reader for {kind!r}")  # pragma: no cover - a schema bug


def _name(kind: Any) -> str:
    if kind is type(None):
        return "null"
    return {float: "a number", int: "an integer", str: "a string", bool: "true or false"}.get(
        kind, getattr(kind, "__name__", str(kind)))
