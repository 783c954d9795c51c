"""StabilityArguments: every option of a butterfly study, declared, documented and validated."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..enums import plain
from ..errors import SpawnStepError, StudyArgumentsError
from ..perturb import PerturbationConfig, PerturbationKind, ScaleMode


@dataclass
class StabilityArguments:
    """Options of ``StabilityTrainer.butterfly``; parse them with ``HfArgumentParser``.

    Child ``k`` of spawn step ``t`` resumes the parent from ``checkpoint-t``, is perturbed
    with seed ``(perturbation_seed, t, k)`` and trains to the parent's last step. Child 0 is
    the unperturbed control when ``control_child`` is on.
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
    parallel_children: int = field(
        default=1,
        metadata={"help": "Train up to this many children of one spawn step together on one device, as one "
                  "stacked model (torch.func.vmap); 1 trains them one after the other. See docs/parallel_children.md."},
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
            raise SpawnStepError("spawn_steps is empty: give at least one step, for example --spawn_steps 0 100.")
        if any(s < 0 for s in steps):
            raise SpawnStepError(f"spawn_steps must be >= 0, got {steps}.")
        self.spawn_steps = sorted(set(steps))
        if self.num_children < 0:
            raise StudyArgumentsError(f"num_children must be >= 0, got {self.num_children}.")
        if self.parallel_children < 1:
            raise StudyArgumentsError(f"parallel_children must be >= 1, got {self.parallel_children}.")
        if self.num_children == 0 and not self.control_child:
            raise StudyArgumentsError("No child to train: set num_children >= 1 or control_child=True.")
        if self.divergence_every < 0:
            raise StudyArgumentsError(f"divergence_every must be >= 0, got {self.divergence_every}.")
        # validates kind, scale, patterns... and converts the choices given as strings
        config = self.perturbation_config()
        self.perturbation_kind, self.perturbation_scale_mode = config.kind, config.scale_mode

    def perturbation_config(self) -> PerturbationConfig:
        """The perturbation every non-control child receives (the seed is mixed with step and child)."""
        return PerturbationConfig(
            kind=self.perturbation_kind,
            scale=self.perturbation_scale,
            scale_mode=self.perturbation_scale_mode,
            normalize=self.perturbation_normalize,
            fraction=self.perturbation_fraction,
            num_entries=self.perturbation_num_entries,
            include=list(self.perturbation_include),
            exclude=list(self.perturbation_exclude),
            seed=self.perturbation_seed,
            batch_size=self.perturbation_batch_size,
        )

    def child_indices(self) -> list[int]:
        """Child indices per spawn step: 0 is the control when enabled, perturbed ones follow."""
        first = 0 if self.control_child else 1
        return list(range(first, self.num_children + 1))

    def child_groups(self) -> list[list[int]]:
        """The children of a spawn step in the groups that train together (``parallel_children`` at a
        time, in index order; groups of one train alone)."""
        children, width = self.child_indices(), self.parallel_children
        return [children[i : i + width] for i in range(0, len(children), width)]

    def config_for_child(self, child: int) -> PerturbationConfig:
        if child == 0:
            return PerturbationConfig(kind=PerturbationKind.NONE, scale=0.0, seed=self.perturbation_seed)
        return self.perturbation_config()

    def to_dict(self) -> dict[str, Any]:
        return plain(asdict(self))

    def plan(self) -> dict[str, Any]:
        """What the run directory's stability_config.json says of the study's layout: the spawn
        steps, the child indices and each child's perturbation (``t<t>`` -> ``c<k>`` -> config)."""
        children = self.child_indices()
        return {
            "spawn_steps": list(self.spawn_steps),
            "children": children,
            "perturbations": {
                f"t{t}": {f"c{k}": self.config_for_child(k).to_dict() for k in children} for t in self.spawn_steps
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
