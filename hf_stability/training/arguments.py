"""StabilityArguments: every option of a butterfly study, declared, documented and validated."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..enums import plain
from ..errors import SpawnStepError, StudyArgumentsError
from ..hints import setting
from ..perturb import REFERENCE_KINDS, RNG_KINDS, PerturbationConfig, PerturbationKind, ScaleMode

#: parallel_children's value that lets the study choose K from the free memory.
AUTO = "auto"


class ChildrenAtOnce(str):
    """The command-line type of ``parallel_children``: a count ("4") or "auto". HfArgumentParser
    hands a flag's text to it; StabilityArguments turns the value into an int or "auto" (in
    Python, pass an int or "auto")."""


@dataclass
class StabilityArguments:
    """Options of ``StabilityTrainer.butterfly``; parse them with ``HfArgumentParser``.

    Child ``k`` of spawn step ``t`` resumes the parent from ``checkpoint-t``, is perturbed
    with seed ``(perturbation_seed, t, k)`` and trains to the parent's last step. Child 0 is
    the unperturbed control when ``control_child`` is on; then come ``num_children`` children
    per perturbation scale (``perturbation_scales``), per single-weight size
    (``single_weight_scales``), and the reference children: ``reference_children`` with another
    init seed (spawn step 0 only) and as many with another data order (every spawn step).
    """

    spawn_steps: list[int] = field(
        default_factory=lambda: [0],
        metadata={"help": "Steps at which children are spawned from the parent (0 = at initialisation)."},
    )
    num_children: int = field(default=2, metadata={"help": "Perturbed children per spawn step."})
    control_child: bool = field(
        default=True,
        metadata={"help": "Also train an unperturbed control child (child 0) per spawn step: the noise floor."},
    )
    perturbation_kind: PerturbationKind = field(
        default=PerturbationKind.GAUSSIAN,
        metadata={"help": "What changes at the spawn step (none: every child is a control)."},
    )
    perturbation_scale: float = field(
        default=0.01, metadata={"help": "sigma: noise = sigma * s_p * eps_p for each parameter tensor p."}
    )
    perturbation_scales: list[float] | None = field(
        default=None,
        metadata={"help": "Several sigmas in one study (replaces perturbation_scale): num_children children per "
                  "scale, all spawned from the one parent, reported group by group."},
    )
    single_weight_scales: list[float] = field(
        default_factory=list,
        metadata={"help": "Also num_children children per size that each move ONE weight by exactly size * s_p "
                  "(the size in units of the init scale, random sign)."},
    )
    reference_children: int = field(
        default=0,
        metadata={"help": "Reference children per kind: this many with another init seed (same data order; at "
                  "spawn step 0, needs model_init) and this many with another data order (at every spawn step), "
                  "the 'as far as two seeds' and 'as far as SGD noise' bands of the report."},
    )
    perturbation_scale_mode: ScaleMode = field(
        default=ScaleMode.INIT,
        metadata={"help": "s_p: the initialiser's std, the tensor's current std, or 1."},
    )
    perturbation_normalize: bool = field(
        default=False,
        metadata={"help": "Rescale the noise to L2 = sigma * sqrt(sum_p s_p^2 n_p), the expected L2 of an init."},
    )
    perturbation_fraction: float | None = field(
        default=None, metadata={"help": "Perturb only this fraction of the selected entries."}
    )
    perturbation_num_entries: int | None = field(
        default=None, metadata={"help": "Perturb exactly this many entries (1 = a single weight)."}
    )
    perturbation_include: list[str] = field(
        default_factory=list, metadata={"help": "Regular expressions: perturb only parameters whose name matches."}
    )
    perturbation_exclude: list[str] = field(
        default_factory=list, metadata={"help": "Regular expressions: never perturb parameters whose name matches."}
    )
    perturbation_trainable_only: bool = field(
        default=True,
        metadata={"help": "Perturb only parameters that train (with PEFT: the adapters); frozen weights perturbed "
                  "would never train again."},
    )
    perturbation_seed: int = field(default=0, metadata={"help": "Seed of the perturbation generators."})
    perturbation_batch_size: int = field(
        default=32, metadata={"help": "Batch size of the gradient direction of perturbation_kind=batch."}
    )
    divergence_every: int = field(
        default=10,
        metadata={"help": "Log each child's L2 distance to the parent every N steps (0: only at the end)."},
    )
    keep_parent_trajectory: bool = field(
        default=False, metadata={"help": "Keep the parent snapshots used for divergence logging (parent/trajectory)."}
    )
    keep_child_checkpoints: bool = field(
        default=False, metadata={"help": "Keep the children's intermediate checkpoints once they have finished."}
    )
    analysis_train_samples: int = field(
        default=2048,
        metadata={"help": "Training examples saved in RUN/data/train for the analyzer's train-set barriers."},
    )
    analysis_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluation examples saved in RUN/data/eval (default: all)."}
    )
    parallel_children: ChildrenAtOnce = field(
        default=1,
        metadata={"help": "Train up to this many children of one spawn step together on one device, as one "
                  "stacked model (torch.func.vmap); 1 trains them one after the other; auto: as many as fit in "
                  "the device's free memory. See docs/parallel_children.md."},
    )
    stacked_cuda_graphs: bool = field(
        default=True,
        metadata={"help": "On CUDA, replay stacked children's training step as CUDA graphs (captured once per "
                  "batch shape), which takes Python's launch time out of each step; a step that cannot be "
                  "captured runs as before. See docs/parallel_children.md."},
    )
    deterministic: bool = field(
        default=False,
        metadata={"help": "Deterministic GPU kernels for parent and children (deterministic algorithms, cuBLAS "
                  "workspace, cuDNN), so that the control child ends bitwise equal to its parent on one GPU, "
                  "at a cost in step time (README). CPU runs are deterministic without it."},
    )
    base_model: str | None = field(
        default=None, metadata={"help": "Hub id of the model being fine-tuned, for the report card's metadata."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub id of the training dataset, for the report card's metadata."}
    )
    overwrite_run: bool = field(
        default=False,
        metadata={"help": "Delete a run of another configuration found in output_dir instead of refusing."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.spawn_steps, int):
            self.spawn_steps = [self.spawn_steps]
        steps = [int(s) for s in self.spawn_steps]
        if not steps:
            raise SpawnStepError(f"spawn_steps is empty: give at least one step, for example "
                                 f"{setting('spawn_steps', [0, 100], '--spawn_steps 0 100')}.")
        if any(s < 0 for s in steps):
            raise SpawnStepError(f"spawn_steps must be >= 0, got {steps}.")
        self.spawn_steps = sorted(set(steps))
        if self.num_children < 0:
            raise StudyArgumentsError(f"num_children must be >= 0, got {self.num_children}.")
        self.parallel_children = _children_at_once(self.parallel_children)
        if self.num_children == 0 and not self.control_child and self.reference_children == 0:
            raise StudyArgumentsError("No child to train: set num_children >= 1, control_child=True or "
                                      "reference_children >= 1.")
        if self.divergence_every < 0:
            raise StudyArgumentsError(f"divergence_every must be >= 0, got {self.divergence_every}.")
        if self.reference_children < 0:
            raise StudyArgumentsError(f"reference_children must be >= 0, got {self.reference_children}.")
        for name in ("perturbation_scales", "single_weight_scales"):
            values = getattr(self, name)
            if values is not None and len(set(values)) != len(values):
                raise StudyArgumentsError(f"{name} must be distinct, got {values}.")
        if self.perturbation_scales is not None and not self.perturbation_scales:
            raise StudyArgumentsError("perturbation_scales is empty: give at least one scale, or leave it unset to "
                                      f"use perturbation_scale ({self.perturbation_scale}).")
        # validates kind, scale, patterns... and converts the choices given as strings
        config = self.perturbation_config()
        self.perturbation_kind, self.perturbation_scale_mode = config.kind, config.scale_mode
        layout = self._layout()  # builds, and so validates, every child's perturbation (each scale, each size)
        if any(at_init for _, at_init in layout.values()) and 0 not in self.spawn_steps:
            raise SpawnStepError(
                "Another initialisation (perturbation_kind=init_seed or reference_children) is a child of spawn "
                f"step 0, and spawn_steps {self.spawn_steps} lacks it: add 0 "
                f"({setting('spawn_steps', [0, *self.spawn_steps], '--spawn_steps 0 ...')}).")

    def perturbation_config(self, scale: float | None = None,
                            kind: PerturbationKind | None = None) -> PerturbationConfig:
        """The perturbation of the perturbed children (the seed is mixed with step and child), at
        ``scale`` (default perturbation_scale) and of ``kind`` (default perturbation_kind)."""
        # the single-weight groups beside another kind's children leave out that kind's sparsity
        single = kind == PerturbationKind.SINGLE_WEIGHT and self.perturbation_kind != kind
        kind = PerturbationKind(kind if kind is not None else self.perturbation_kind)
        return PerturbationConfig(
            kind=kind,
            scale=self.perturbation_scale if scale is None else scale,
            scale_mode=self.perturbation_scale_mode,
            normalize=self.perturbation_normalize and not single,
            fraction=None if single else self.perturbation_fraction,
            num_entries=None if single else self.perturbation_num_entries,
            include=list(self.perturbation_include),
            exclude=list(self.perturbation_exclude),
            seed=self.perturbation_seed,
            batch_size=self.perturbation_batch_size,
            trainable_only=self.perturbation_trainable_only,
        )

    def _layout(self) -> dict[int, tuple[PerturbationConfig, bool]]:
        """Child index -> (its perturbation, whether it exists at spawn step 0 only)."""
        layout: dict[int, tuple[PerturbationConfig, bool]] = {}
        if self.control_child:
            layout[0] = (PerturbationConfig(kind=PerturbationKind.NONE, scale=0.0, seed=self.perturbation_seed),
                         False)
        groups = [self.perturbation_config(scale) for scale in (self.perturbation_scales or [self.perturbation_scale])]
        groups += [self.perturbation_config(size, PerturbationKind.SINGLE_WEIGHT) for size in self.single_weight_scales]
        k = 1
        for config in groups:
            for _ in range(self.num_children):
                layout[k] = (config, config.kind == PerturbationKind.INIT_SEED)
                k += 1
        for kind in REFERENCE_KINDS:
            for _ in range(self.reference_children):
                layout[k] = (self.perturbation_config(0.0, kind), kind == PerturbationKind.INIT_SEED)
                k += 1
        return layout

    def references(self) -> dict[int, str]:
        """The reference children (index -> init_seed | data_order): the last 2 x reference_children."""
        layout = self._layout()
        chosen = list(layout)[len(layout) - 2 * self.reference_children:] if self.reference_children else []
        return {k: layout[k][0].kind.value for k in chosen}

    def child_indices(self) -> list[int]:
        """Every child index of the study: 0 is the control when enabled, perturbed ones follow
        (a spawn step's own: ``children_at``)."""
        return list(self._layout())

    def children_at(self, t: int) -> list[int]:
        """The children of spawn step ``t`` (another initialisation is a child of step 0 only)."""
        return [k for k, (_, at_init) in self._layout().items() if t == 0 or not at_init]

    @property
    def children_at_once(self) -> int:
        """How many children train together: ``parallel_children``, or for "auto" the K the
        study chose before training (``choose_children_at_once``; 1 until then)."""
        if self.parallel_children == AUTO:
            return getattr(self, "_chosen_children_at_once", 1)
        return int(self.parallel_children)

    def choose_children_at_once(self, k: int) -> None:
        """Record the K that ``parallel_children="auto"`` came to (training/stacked.py chooses it)."""
        if self.parallel_children != AUTO:
            raise StudyArgumentsError(f"parallel_children is {self.parallel_children}, not {AUTO!r}: nothing to "
                                      "choose.")
        self._chosen_children_at_once = max(1, int(k))

    def stackable_children(self, t: int, width: int | None = None) -> list[int]:
        """The children of spawn step ``t`` that may train stacked (at ``width`` at a time, default
        ``children_at_once``). A child with its own data order or dropout stream always trains
        alone (a stacked model sees one), and so does the control of a deterministic study
        (bitwise its parent; a stacked child is within rounding of itself alone)."""
        layout, width = self._layout(), self.children_at_once if width is None else width
        return [k for k in self.children_at(t)
                if not (layout[k][0].kind in RNG_KINDS or (k == 0 and self.control_child and self.deterministic
                                                            and width > 1))]

    def child_groups(self, t: int) -> list[list[int]]:
        """The children of spawn step ``t`` in the groups that train together (``children_at_once``
        at a time, in index order; groups of one train alone: see ``stackable_children``)."""
        width = self.children_at_once
        stackable = self.stackable_children(t)
        alone = [[k] for k in self.children_at(t) if k not in stackable]
        return [stackable[i : i + width] for i in range(0, len(stackable), width)] + alone

    def config_for_child(self, child: int) -> PerturbationConfig:
        return self._layout()[child][0]

    def to_dict(self) -> dict[str, Any]:
        return plain(asdict(self))

    def plan(self) -> dict[str, Any]:
        """What the run directory's stability_config.json says of the study's layout: the spawn
        steps, every child index, each step's children and each child's perturbation (``t<t>`` ->
        ``c<k>`` -> config)."""
        return {
            "spawn_steps": list(self.spawn_steps),
            "children": self.child_indices(),
            "children_at": {f"t{t}": self.children_at(t) for t in self.spawn_steps},
            "references": {f"c{k}": kind for k, kind in self.references().items()},
            "perturbations": {
                f"t{t}": {f"c{k}": self.config_for_child(k).to_dict() for k in self.children_at(t)}
                for t in self.spawn_steps
            },
        }

    @classmethod
    def from_recorded(cls, values: dict[str, Any]) -> StabilityArguments:
        """The arguments recorded in a run's stability_config.json (fields it lacks take their
        defaults; fields this version does not know are refused)."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise StudyArgumentsError(f"unknown stability arguments {unknown}")
        return cls(**values)


def _children_at_once(value: Any) -> int | str:
    """``parallel_children`` as given (an int, its text, or "auto") -> an int >= 1 or "auto"."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    count = None
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    elif isinstance(value, str) and value.strip().isdigit():
        count = int(value)
    if count is None or count < 1:
        raise StudyArgumentsError(f"parallel_children must be a count >= 1 or {AUTO!r}, got {value!r}.")
    return count
