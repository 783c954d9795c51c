"""The run directory: the contract between training and analysis (see docs/run_directory.md).

```
RUN/stability_config.json
RUN/parent/checkpoint-<t>/             Trainer checkpoints at the spawn steps
RUN/parent/final/                      model.safetensors, config, tokenizer, eval_results.json
RUN/children/t<t>/c<k>/final/          the same for child k of spawn step t (k=0: control)
RUN/children/t<t>/c<k>/perturbation.json
RUN/children/t<t>/c<k>/divergence.jsonl
RUN/children/t<t>/c<k>/diverged.json   only for a child whose loss or weights became NaN/Inf
RUN/data/train, RUN/data/eval          model inputs for the analyzer (datasets.save_to_disk)
RUN/analysis/report.json               written by the analyzer
```
A folder named ``final`` appears in one rename once everything in it is written, so its
presence means the run finished.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic_io import read_jsonl, remove_stale_temporaries, write_json
from .errors import RunConfigMismatchError, RunDirectoryError

FORMAT_VERSION = 1
CONFIG_NAME = "stability_config.json"
EVAL_RESULTS_NAME = "eval_results.json"
_CHECKPOINT_PREFIX = "checkpoint-"


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
    state = path / "trainer_state.json"
    if not path.is_dir():
        return "it does not exist"
    if not any(path.glob("model*.safetensors")):
        return "no weights (model.safetensors)"
    if not any(path.glob("rng_state*.pth")):
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


def _checkpoint_step(path: Path) -> int | None:
    if not path.name.startswith(_CHECKPOINT_PREFIX):
        return None
    try:
        return int(path.name[len(_CHECKPOINT_PREFIX) :])
    except ValueError:
        return None


@dataclass
class ChildSummary:
    """One line of a butterfly study's summary table."""

    spawn_step: int
    child: int
    is_control: bool
    status: str
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
    def parent_dir(self) -> Path:
        return self.root / "parent"

    @property
    def parent_final(self) -> Path:
        return self.parent_dir / "final"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def analysis_dir(self) -> Path:
        return self.root / "analysis"

    @property
    def initial_weights(self) -> Path:
        return self.parent_dir / "initial" / "model.safetensors"

    @property
    def trajectory_dir(self) -> Path:
        return self.parent_dir / "trajectory"

    def trajectory_file(self, step: int) -> Path:
        return self.trajectory_dir / f"step-{step}.safetensors"

    def parent_checkpoint(self, step: int) -> Path:
        return self.parent_dir / f"{_CHECKPOINT_PREFIX}{step}"

    def child_dir(self, spawn_step: int, child: int) -> Path:
        return self.root / "children" / f"t{spawn_step}" / f"c{child}"

    def child_final(self, spawn_step: int, child: int) -> Path:
        return self.child_dir(spawn_step, child) / "final"

    # state
    def load_config(self) -> dict[str, Any]:
        if not self.config_file.is_file():
            raise RunDirectoryError(
                f"{self.root} is not a run directory: {CONFIG_NAME} is missing. "
                "Point to the output_dir of a StabilityTrainer.butterfly() run."
            )
        try:
            config = json.loads(self.config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise RunDirectoryError(f"{self.config_file} is not valid JSON ({err}); re-run with overwrite.") from None
        if config.get("format_version") != FORMAT_VERSION:
            raise RunDirectoryError(self._version_message(config) + ".")
        return config

    def _version_message(self, config: dict[str, Any]) -> str:
        written_by = (config.get("versions") or {}).get("hf_stability", "another version")
        return (
            f"{self.root} holds a run of format version {config.get('format_version')}, this hf_stability reads "
            f"version {FORMAT_VERSION}: open it with the hf_stability that wrote it ({written_by})"
        )

    def child_status(self, spawn_step: int, child: int) -> str:
        """'done', 'diverged' or 'pending'."""
        directory = self.child_dir(spawn_step, child)
        if (directory / "final").is_dir():
            return "done"
        if (directory / "diverged.json").is_file():
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
            (p for p in directory.iterdir() if p.is_dir() and _checkpoint_step(p) is not None),
            key=_checkpoint_step,
        )
        best = None
        for path in candidates:
            step = _checkpoint_step(path)
            usable = is_complete_checkpoint(path) and all(f.is_file() for f in (requires(step) if requires else []))
            if usable:
                best = path
        for path in candidates:
            if best is None or _checkpoint_step(path) > _checkpoint_step(best):
                shutil.rmtree(path, ignore_errors=True)
        return best

    def prepare(self, config: dict[str, Any], overwrite: bool = False) -> None:
        """Write ``stability_config.json``, or check that the run found here has the same
        configuration (resume). A run of another configuration is refused unless ``overwrite``."""
        self.root.mkdir(parents=True, exist_ok=True)
        owned = [self.config_file, self.parent_dir, self.root / "children", self.analysis_dir, self.data_dir]
        if self.config_file.is_file():
            try:
                old = json.loads(self.config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                old = {}
            if old.get("format_version", FORMAT_VERSION) != FORMAT_VERSION and not overwrite:
                raise RunDirectoryError(self._version_message(old) + ", or pass --overwrite_run to delete it.")
            if old.get("fingerprint") == config["fingerprint"] and old.get("format_version") == FORMAT_VERSION:
                return
            if not overwrite:
                diffs = _differences(old.get("identity", {}), config["identity"])
                shown = "; ".join(diffs[:5]) + (" ..." if len(diffs) > 5 else "")
                raise RunConfigMismatchError(
                    f"{self.root} holds a run of another configuration ({shown or 'unreadable config'}). "
                    "Choose another output_dir, or pass --overwrite_run (StabilityArguments.overwrite_run=True) "
                    "to delete it."
                )
        elif any(p.exists() for p in owned[1:]) and not overwrite:
            raise RunConfigMismatchError(
                f"{self.root} holds parent/ or children/ folders but no {CONFIG_NAME}: it is not a run this "
                "version can resume. Choose another output_dir or pass --overwrite_run to delete them."
            )
        for path in owned:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        write_json(self.config_file, config)

    def summary(self) -> list[ChildSummary]:
        """One row per child: status, final L2 to the parent, evaluation metrics."""
        config = self.load_config()
        max_steps = int(config["max_steps"])
        rows = []
        for t in config["spawn_steps"]:
            for k in config["children"]:
                directory = self.child_dir(t, k)
                trajectory = read_jsonl(directory / "divergence.jsonl")
                final = [r["l2"] for r in trajectory if r.get("step") == max_steps]
                start = [r["l2"] for r in trajectory if r.get("step") == t]
                results = directory / "final" / EVAL_RESULTS_NAME
                metrics = json.loads(results.read_text(encoding="utf-8")) if results.is_file() else {}
                rows.append(
                    ChildSummary(
                        spawn_step=int(t),
                        child=int(k),
                        is_control=int(k) == 0 and bool(config["stability_arguments"]["control_child"]),
                        status=self.child_status(t, k),
                        final_l2=final[-1] if final else None,
                        perturbation_l2=start[-1] if start else None,
                        eval_metrics=metrics,
                    )
                )
        return rows

    def parent_metrics(self) -> dict[str, float]:
        results = self.parent_final / EVAL_RESULTS_NAME
        return json.loads(results.read_text(encoding="utf-8")) if results.is_file() else {}
