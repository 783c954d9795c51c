"""The run directory: the contract between training and analysis (see docs/run_directory.md).

```
RUN/stability_config.json
RUN/.hf_stability.lock                 the lock of the process writing the run
RUN/parent/initial/model.safetensors   the parent's weights before training
RUN/parent/checkpoint-<t>/             Trainer checkpoints at the spawn steps
RUN/parent/trajectory/step-<s>.safetensors  the parent's weights at the divergence steps
RUN/parent/final/                      model.safetensors, config, tokenizer, eval_results.json, manifest.json
RUN/children/t<t>/c<k>/final/          the same for child k of spawn step t (k=0: control)
RUN/children/t<t>/c<k>/perturbation.json
RUN/children/t<t>/c<k>/divergence.jsonl
RUN/children/t<t>/c<k>/diverged.json   only for a child whose loss or weights became NaN/Inf
RUN/data/train, RUN/data/eval          model inputs for the analyzer (datasets.save_to_disk)
RUN/data/collator.json, RUN/data/tokenizer/, RUN/data/manifest.json
RUN/analysis/report.json               written by the analyzer
RUN/analysis/plots/*.png, RUN/analysis/README.md   written by the report stage
```
Every file and folder name is a constant here, with a path method of ``RunDirectory``; no
other module spells one. A folder named ``final`` appears in one rename once everything in it
is written, so its presence means the run finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic_io import disk_full_error, remove_stale_temporaries, write_json
from .errors import RunConfigMismatchError, RunDirectoryError
from .hints import setting
from .run_files import read_divergence, read_json

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "stability_config.json"
#: The run directory's lock file (run_lock.py): one writer at a time.
LOCK_NAME = ".hf_stability.lock"
PARENT_DIR = "parent"
CHILDREN_DIR = "children"
DATA_DIR = "data"
ANALYSIS_DIR = "analysis"
FINAL_DIR = "final"
INITIAL_DIR = "initial"
TRAJECTORY_DIR = "trajectory"
PLOTS_DIR = "plots"
TOKENIZER_DIR = "tokenizer"
#: Names the Trainer and save_pretrained give their files (transformers' SAFE_WEIGHTS_NAME, TRAINER_STATE_NAME).
WEIGHTS_NAME = "model.safetensors"
CONFIG_JSON = "config.json"
TRAINER_STATE_NAME = "trainer_state.json"
WEIGHTS_GLOB = "model*.safetensors"  # one file, or the shards of a large model
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"  # a PEFT model's checkpoint: its adapter only
ADAPTER_CONFIG_NAME = "adapter_config.json"
#: A PEFT study's frozen base model (save_pretrained), saved once: every final/ holds only an adapter.
BASE_MODEL_DIR = "base_model"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
RNG_STATE_GLOB = "rng_state*.pth"  # rng_state.pth, or rng_state_<rank>.pth in a distributed run
EVAL_RESULTS_NAME = "eval_results.json"
#: Checksums of a run's files (manifest.py): final/manifest.json of the parent and of each child, data/manifest.json.
MANIFEST_NAME = "manifest.json"
PERTURBATION_NAME = "perturbation.json"
DIVERGENCE_NAME = "divergence.jsonl"
DIVERGED_NAME = "diverged.json"
COLLATOR_NAME = "collator.json"
REPORT_NAME = "report.json"
TIMINGS_NAME = "timings.json"
CARD_NAME = "README.md"
_CHECKPOINT_PREFIX = "checkpoint-"
_STEP_PREFIX = "step-"


def fingerprint(data: Any) -> str:
    """sha256 of the canonical JSON of ``data``."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def checkpoint_problem(path: Path) -> str | None:
    """What a Trainer checkpoint lacks (None when it is complete): its trainer_state.json (written
    last) must parse, and its weights and its RNG state must exist (resuming without the RNG
    state would silently draw other dropout masks and another data order)."""
    state = path / TRAINER_STATE_NAME
    if not path.is_dir():
        return "it does not exist"
    if not any(path.glob(WEIGHTS_GLOB)) and not (path / ADAPTER_WEIGHTS_NAME).is_file():
        return "no weights (model.safetensors, or a PEFT adapter's adapter_model.safetensors)"
    if not any(path.glob(RNG_STATE_GLOB)):
        return "no RNG state (rng_state.pth)"
    if not state.is_file():
        return "no trainer_state.json (its save did not finish)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return "an unreadable trainer_state.json"
    return None


def is_complete_checkpoint(path: Path) -> bool:
    """Whether a Trainer checkpoint is whole (see checkpoint_problem)."""
    return checkpoint_problem(path) is None


def checkpoint_step(path: Path) -> int | None:
    """The optimizer step of a Trainer checkpoint folder (``checkpoint-<step>``), None for another name."""
    if not path.name.startswith(_CHECKPOINT_PREFIX):
        return None
    try:
        return int(path.name[len(_CHECKPOINT_PREFIX) :])
    except ValueError:
        return None


#: The narrowest remedy for a damaged stability_config.json (prepare() rebuilds it).
CONFIG_REMEDY = (
    "Run the study again with the arguments its models were trained with (it rewrites stability_config.json when "
    "they are the ones the run's manifests record), or restore the file from a copy of the run."
)


def kept_snapshot_steps(spawn_steps: list[int], max_steps: int) -> list[int]:
    """The parent's snapshots (parent/trajectory/step-<s>) a finished study keeps: the spawn steps
    after 0 (step 0 is parent/initial) and the last step, so that a damaged child can be trained
    again alone and measured against its parent. They cost one copy of the trained weights each."""
    return sorted({t for t in spawn_steps if t > 0} | {max_steps})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_config(config: dict[str, Any], path: Path) -> None:
    """The fields of ``stability_config.json`` that hf_stability reads back, type-checked: a
    damaged or crafted file (a spawn step "5/../../x") is refused, naming the field, before any
    of its values becomes a path or a number."""

    def refuse(field_name: str, expected: str) -> None:
        raise RunDirectoryError(
            f"{path}: the field {field_name!r} holds {str(config.get(field_name))[:120]!r}, not {expected}: the file "
            f"was edited or damaged. {CONFIG_REMEDY}"
        )

    if not _is_int(config.get("max_steps")) or config["max_steps"] < 1:
        refuse("max_steps", "a positive integer")
    for name in ("spawn_steps", "children"):
        values = config.get(name)
        if not isinstance(values, list) or not values or not all(_is_int(v) and v >= 0 for v in values):
            refuse(name, "a non-empty list of non-negative integers")
    if any(t >= config["max_steps"] for t in config["spawn_steps"]):
        refuse("spawn_steps", f"steps below max_steps ({config['max_steps']})")
    if not isinstance(config.get("fingerprint"), str):
        refuse("fingerprint", "a string")
    stability = config.get("stability_arguments")
    if not isinstance(stability, dict) or not isinstance(stability.get("control_child"), bool):
        refuse("stability_arguments", "an object with a boolean control_child")
    for key in ("base_model", "dataset_name"):
        if stability.get(key) is not None and not isinstance(stability[key], str):
            refuse("stability_arguments", f"an object whose {key} is a string or null")
    perturbations = config.get("perturbations")
    if not isinstance(perturbations, dict) or not all(
        isinstance(by_child, dict) and all(isinstance(c, dict) for c in by_child.values())
        for by_child in perturbations.values()
    ):
        refuse("perturbations", "an object of spawn steps holding an object per child")
    identity = config.get("identity")
    if not isinstance(identity, dict) or fingerprint(identity) != config["fingerprint"]:
        refuse("fingerprint", "the fingerprint of the run's identity (the arguments that fix its weights)")
    # every field read back must be what the fingerprinted identity says
    from .errors import HfStabilityError
    from .perturb import PerturbationConfig
    from .training.arguments import StabilityArguments

    try:
        plan = StabilityArguments.from_recorded(identity.get("stability_arguments") or {}).plan()
        # a run of an earlier version records fewer perturbation fields: they take their defaults
        recorded = {**config, "perturbations": {
            t: {c: PerturbationConfig.from_dict(values).to_dict() for c, values in by_child.items()}
            for t, by_child in config["perturbations"].items()}}
    except (HfStabilityError, TypeError) as err:
        raise RunDirectoryError(f"{path}: it holds stability arguments this version cannot read ({err}). "
                                f"{CONFIG_REMEDY}") from None
    expected = {**plan, "max_steps": identity.get("max_steps")}
    if "children_at" not in config and all(at == plan["children"] for at in plan["children_at"].values()):
        del expected["children_at"]  # a run of an earlier version: every spawn step has every child
    if "references" not in config and not plan["references"]:
        del expected["references"]  # a run of an earlier version: no reference children
    for name, value in expected.items():
        if recorded.get(name) != value:
            refuse(name, f"what the run's fingerprinted identity says ({value!r})")
    if stability["control_child"] != identity["stability_arguments"].get("control_child", True):
        refuse("stability_arguments", "the control_child of the run's fingerprinted identity")


def children_of(config: dict[str, Any], spawn_step: int) -> list[int]:
    """The children of ``spawn_step`` in a (checked) stability_config.json."""
    return list(config.get("children_at", {}).get(f"t{spawn_step}", config["children"]))


def child_group(config: dict[str, Any], spawn_step: int, child: int) -> tuple[str, str | None]:
    """(group, reference) of a child in a (checked) stability_config.json: its perturbation's
    group ("gaussian 0.01"...), or for a reference child "<kind> reference" and its kind."""
    from .perturb import PerturbationConfig

    reference = config.get("references", {}).get(f"c{child}")
    if reference is not None:
        return f"{reference} reference", reference
    return PerturbationConfig.from_dict(config["perturbations"][f"t{spawn_step}"][f"c{child}"]).group, None


@dataclass
class ChildSummary:
    """One line of a butterfly study's summary table."""

    spawn_step: int
    child: int
    is_control: bool
    status: str
    group: str = "control"  # its perturbation (child_group)
    final_l2: float | None = None
    perturbation_l2: float | None = None
    eval_metrics: dict[str, float] = field(default_factory=dict)


class RunDirectory:
    """Paths and completion state of a butterfly run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # paths
    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_NAME

    @property
    def parent_dir(self) -> Path:
        return self.root / PARENT_DIR

    @property
    def parent_final(self) -> Path:
        return self.parent_dir / FINAL_DIR

    @property
    def initial_weights(self) -> Path:
        return self.parent_dir / INITIAL_DIR / WEIGHTS_NAME

    @property
    def trajectory_dir(self) -> Path:
        return self.parent_dir / TRAJECTORY_DIR

    def trajectory_file(self, step: int) -> Path:
        return self.trajectory_dir / f"{_STEP_PREFIX}{step}.safetensors"

    def parent_checkpoint(self, step: int) -> Path:
        return self.parent_dir / f"{_CHECKPOINT_PREFIX}{step}"

    def child_dir(self, spawn_step: int, child: int) -> Path:
        return self.root / CHILDREN_DIR / f"t{spawn_step}" / f"c{child}"

    def child_final(self, spawn_step: int, child: int) -> Path:
        return self.child_dir(spawn_step, child) / FINAL_DIR

    def perturbation_file(self, spawn_step: int, child: int) -> Path:
        return self.child_dir(spawn_step, child) / PERTURBATION_NAME

    def divergence_file(self, spawn_step: int, child: int) -> Path:
        return self.child_dir(spawn_step, child) / DIVERGENCE_NAME

    def diverged_file(self, spawn_step: int, child: int) -> Path:
        return self.child_dir(spawn_step, child) / DIVERGED_NAME

    def stacked_group_dir(self, spawn_step: int, children: list[int]) -> Path:
        """Scratch output_dir of a stacked group (a temporary: deleted when the group is written)."""
        return self.root / CHILDREN_DIR / f"t{spawn_step}" / f".stacked-{'-'.join(map(str, children))}.tmp"

    def parent_name(self, path: Path) -> str:
        """A parent's file by its name in the parent's manifest (relative to parent/)."""
        return path.relative_to(self.parent_dir).as_posix()

    @staticmethod
    def manifest_of(final_dir: Path) -> Path:
        """The manifest of the run whose final/ is ``final_dir`` (its names are relative to the run's folder)."""
        return final_dir / MANIFEST_NAME

    @property
    def base_model_dir(self) -> Path:
        return self.root / BASE_MODEL_DIR

    @property
    def data_dir(self) -> Path:
        return self.root / DATA_DIR

    def data_split(self, split: str) -> Path:
        """RUN/data/<split> (train, eval): saved model inputs."""
        return self.data_dir / split

    @property
    def collator_file(self) -> Path:
        return self.data_dir / COLLATOR_NAME

    @property
    def data_tokenizer(self) -> Path:
        return self.data_dir / TOKENIZER_DIR

    @property
    def data_manifest(self) -> Path:
        return self.data_dir / MANIFEST_NAME

    @property
    def analysis_dir(self) -> Path:
        return self.root / ANALYSIS_DIR

    @property
    def report_file(self) -> Path:
        return self.analysis_dir / REPORT_NAME

    @property
    def timings_file(self) -> Path:
        """The wall time of each stage of the last analysis (analysis/timing.py)."""
        return self.analysis_dir / TIMINGS_NAME

    @property
    def plots_dir(self) -> Path:
        return self.analysis_dir / PLOTS_DIR

    @property
    def card_file(self) -> Path:
        return self.analysis_dir / CARD_NAME

    def own_folder(self, folder: Path) -> Path:
        """``folder``, a folder of this run that hf_stability writes into (analysis/, its plots/),
        created if missing and checked: neither it nor a folder on its way from the run's root may
        be a symbolic link (a link planted in a downloaded run would have reports written anywhere),
        and it must be writable, so that no work is done for a write that cannot happen."""
        current = self.root
        for part in folder.relative_to(self.root).parts:
            current = current / part
            if current.is_symlink():
                raise RunDirectoryError(
                    f"{current} is a symbolic link (to {os.readlink(current)}): hf_stability writes only inside the "
                    "run directory. Replace the link with a real folder (or remove it) and run this again."
                )
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder) as probe:  # a byte, so that a full disk shows too
                probe.write(b"0")
                probe.flush()
        except OSError as err:
            full = disk_full_error(err, folder)
            if full is not None:
                raise full from err
            raise RunDirectoryError(
                f"Cannot write into {folder} ({err.strerror or err}): make it writable (or copy the run "
                "directory somewhere writable) and run this again."
            ) from None
        return folder

    def remove_temporaries(self) -> None:
        """Delete what killed writers left anywhere in the run (every temporary is named
        ``.<name>[.<random>].tmp``: atomic files, ``.final.tmp``, stacked groups' scratch folders,
        push staging). Call it only while holding the run's lock."""
        if not self.root.is_dir():
            return
        for folder, subfolders, _ in os.walk(self.root):
            remove_stale_temporaries(folder)
            subfolders[:] = [d for d in subfolders if not (d.startswith(".") and d.endswith(".tmp"))]

    # state
    def load_config(self) -> dict[str, Any]:
        """``stability_config.json``, read and checked (shape, and agreement with the run's
        fingerprinted identity).

        Raises:
            RunDirectoryError: no config, another format version, or a damaged config.
        """
        if not self.config_file.is_file():
            raise RunDirectoryError(
                f"{self.root} is not a run directory: {CONFIG_NAME} is missing. "
                "Point to the output_dir of a StabilityTrainer.butterfly() run."
            )
        config = read_json(self.config_file, CONFIG_REMEDY)
        if config.get("format_version") != FORMAT_VERSION:
            raise RunDirectoryError(self._version_message(config) + ".")
        _validate_config(config, self.config_file)
        return config

    def recorded_fingerprint(self) -> str | None:
        """The run fingerprint recorded in the parent's or the data's manifest (None: neither has
        one): what a damaged stability_config.json is rebuilt against."""
        for manifest in (self.manifest_of(self.parent_final), self.data_manifest):
            try:
                value = read_json(manifest, "").get("fingerprint")
            except RunDirectoryError:
                continue
            if isinstance(value, str):
                return value
        return None

    def _version_message(self, config: dict[str, Any]) -> str:
        written_by = (config.get("versions") or {}).get("hf_stability", "another version")
        return (
            f"{self.root} holds a run of format version {config.get('format_version')}, this hf_stability reads "
            f"version {FORMAT_VERSION}: open it with the hf_stability that wrote it ({written_by})"
        )

    def child_status(self, spawn_step: int, child: int) -> str:
        """'done', 'diverged' or 'pending'."""
        if self.child_final(spawn_step, child).is_dir():
            return "done"
        if self.diverged_file(spawn_step, child).is_file():
            return "diverged"
        return "pending"

    def last_complete_checkpoint(
        self, directory: Path, requires: Callable[[int], list[Path]] | None = None
    ) -> Path | None:
        """The newest complete checkpoint in ``directory`` for which every file that
        ``requires(step)`` names exists. Incomplete checkpoints (a killed save), checkpoints
        newer than the one returned and killed writers' temporaries are deleted."""
        if not directory.is_dir():
            return None
        remove_stale_temporaries(directory)
        candidates = sorted(
            (p for p in directory.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
            key=checkpoint_step,
        )
        best = None
        for path in candidates:
            step = checkpoint_step(path)
            usable = is_complete_checkpoint(path) and all(f.is_file() for f in (requires(step) if requires else []))
            if usable:
                best = path
        for path in candidates:
            if best is None or checkpoint_step(path) > checkpoint_step(best):
                shutil.rmtree(path, ignore_errors=True)
        return best

    def prepare(self, config: dict[str, Any], overwrite: bool = False) -> None:
        """Write ``stability_config.json``, or check that the run found here has the same
        configuration (resume). A run of another configuration is refused unless ``overwrite``."""
        self.root.mkdir(parents=True, exist_ok=True)
        owned = [self.config_file, self.parent_dir, self.root / CHILDREN_DIR, self.analysis_dir, self.data_dir,
                 self.base_model_dir]
        if self.config_file.is_file():
            try:
                old = read_json(self.config_file, CONFIG_REMEDY)
            except RunDirectoryError:
                old = None
            if old is not None and old.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
                if not overwrite:
                    raise RunDirectoryError(self._version_message(old)
                                            + f", or set {setting('overwrite_run')} to delete it.")
            else:
                try:
                    if old is None:
                        raise RunDirectoryError("unreadable")
                    _validate_config(old, self.config_file)
                except RunDirectoryError as damaged:
                    # a damaged config, whose models may be intact: rebuilt when these arguments are the run's
                    if self.recorded_fingerprint() == config["fingerprint"]:
                        logger.warning("%s was damaged; rebuilt from these arguments, which are the ones the run's "
                                       "manifests record.", self.config_file)
                        write_json(self.config_file, config)
                        return
                    if not overwrite:
                        raise RunDirectoryError(
                            f"{self.config_file} is damaged ({damaged}), and no manifest of the run records these "
                            "arguments: run the study with the arguments its models were trained with, restore the "
                            f"file from a copy of the run, or set {setting('overwrite_run')} to delete the run."
                        ) from None
                    old = None
            if old is not None and old.get("fingerprint") == config["fingerprint"] \
                    and old.get("format_version") == FORMAT_VERSION:
                return
            if old is not None and not overwrite:
                diffs = _differences(old.get("identity", {}), config["identity"])
                shown = "; ".join(diffs[:5]) + (" ..." if len(diffs) > 5 else "")
                raise RunConfigMismatchError(
                    f"{self.root} holds a run of another configuration ({shown}). "
                    f"Choose another output_dir, or set {setting('overwrite_run')} to delete it.", path=self.root,
                    differences=diffs,
                )
        elif any(p.exists() for p in owned[1:]) and not overwrite:
            raise RunConfigMismatchError(
                f"{self.root} holds parent/ or children/ folders but no {CONFIG_NAME}: it is not a run this "
                f"version can resume. Choose another output_dir or set {setting('overwrite_run')} to delete them.",
                path=self.root,
            )
        for path in owned:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        write_json(self.config_file, config)

    def child_remedy(self, spawn_step: int, child: int) -> str:
        """The narrowest remedy for a damaged file of a child: train that child again alone."""
        return (
            f"Delete {self.child_dir(spawn_step, child)} and run the study again: it trains that child alone again "
            f"from the parent's checkpoint-{spawn_step}, which a finished study keeps for this."
        )

    def data_remedy(self) -> str:
        """The narrowest remedy for damaged saved data (RUN/data)."""
        return (f"The saved data of {self.data_dir} is damaged: restore that folder from a copy of the run, or analyse "
                "with your own data: analyze_run(..., eval_data=..., train_data=...).")

    def base_model_remedy(self) -> str:
        """The narrowest remedy for a damaged or missing base model of a PEFT study (RUN/base_model)."""
        return (f"Delete {self.base_model_dir} and run the study again: it saves the base model again before "
                "anything trains.")

    def parent_remedy(self) -> str:
        """The narrowest remedy for a damaged file of the parent's final/."""
        return (
            f"Restore {self.parent_final} from a copy of the run; otherwise the parent and every child must be trained "
            f"again ({setting('overwrite_run')})."
        )

    def divergence(self, spawn_step: int, child: int) -> list[dict[str, Any]]:
        """A child's divergence record (strict once the child is done: every line must be whole)."""
        return read_divergence(self.divergence_file(spawn_step, child), self.child_remedy(spawn_step, child),
                               finished=self.child_status(spawn_step, child) == "done")

    def eval_results(self, final_dir: Path, remedy: str) -> dict[str, float]:
        """The eval_results.json of a final/ folder ({} when the run had no eval set)."""
        path = final_dir / EVAL_RESULTS_NAME
        return read_json(path, remedy) if path.is_file() else {}

    def summary(self) -> list[ChildSummary]:
        """One row per child: status, final L2 to the parent, evaluation metrics."""
        config = self.load_config()
        max_steps = int(config["max_steps"])
        rows = []
        for t in config["spawn_steps"]:
            for k in children_of(config, t):
                trajectory = self.divergence(t, k)
                final = [r["l2"] for r in trajectory if r.get("step") == max_steps]
                start = [r["l2"] for r in trajectory if r.get("step") == t]
                rows.append(
                    ChildSummary(
                        spawn_step=int(t),
                        child=int(k),
                        is_control=int(k) == 0 and bool(config["stability_arguments"]["control_child"]),
                        status=self.child_status(t, k),
                        group=child_group(config, t, k)[0],
                        final_l2=final[-1] if final else None,
                        perturbation_l2=start[-1] if start else None,
                        eval_metrics=self.eval_results(self.child_final(t, k), self.child_remedy(t, k)),
                    )
                )
        return rows

    def parent_metrics(self) -> dict[str, float]:
        return self.eval_results(self.parent_final, self.parent_remedy())
