"""What an analysis reads from a run directory, read once and verified.

Every file the study wrote is checked against the checksums its run recorded (manifest.py), so
a damaged file is named with its remedy instead of becoming a wrong number. Records and small
files are checked as they are read; the large ones (weights, saved data) are hashed in
background threads from the start, data and parent first, and each is compared with its record
before its bytes are used (``verify``) and all before a report is written (``verify_all``): the
analysis starts while a study's gigabytes are still being read. The checksums also identify the
inputs of every measured pair: an earlier report's pair is reused only when the checksums of its
models, records and data, and the arguments, are the same as now (``pair_fingerprint``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import RunDirectoryError
from ..manifest import LATER_BYTES, BackgroundDigests, ChecksumCheck, files_under, named_files, sha256_of, verify
from ..run_directory import (
    ADAPTER_CONFIG_NAME,
    CONFIG_JSON,
    DIVERGENCE_NAME,
    EVAL_RESULTS_NAME,
    MANIFEST_NAME,
    PERTURBATION_NAME,
    RunDirectory,
    child_group,
    children_of,
    fingerprint,
)
from ..run_files import read_json

logger = logging.getLogger(__name__)

#: adapter_config.json fields that PEFT saves from a set (their order is not the adapter's).
PEFT_MODULE_SETS = ("target_modules", "modules_to_save", "exclude_modules")


@dataclass
class ChildInputs:
    """One child of a spawn step as the analysis sees it."""

    spawn_step: int
    child: int
    status: str  # done | diverged | pending
    checksums: dict[str, str] = field(default_factory=dict)  # verified files (final/, records)
    config: str = ""  # model_config_fingerprint of its final/config.json
    perturbation_l2: float = 0.0
    group: str = "control"  # the children of its spawn step with its perturbation (PerturbationConfig.group)
    reference: str | None = None  # init_seed | data_order: a reference child
    relative_size: float | None = None  # its perturbation's L2 over the L2 of an initialisation
    divergence: list[dict[str, Any]] = field(default_factory=list)
    diverged: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return f"t{self.spawn_step}/c{self.child}"

    def trained_l2(self, max_steps: int) -> float | None:
        """The L2 to the parent this child measured at the last step, during training."""
        last = [row["l2"] for row in self.divergence if row["step"] == max_steps]
        return float(last[-1]) if last else None


@dataclass
class RunInputs:
    """The config, the checksums of the data and the parent, and every child (see module doc)."""

    config: dict[str, Any]
    data: dict[str, str]
    parent: dict[str, str]
    parent_config: str
    children: dict[tuple[int, int], ChildInputs]
    base: dict[str, str] = field(default_factory=dict)  # a PEFT study's base model (RUN/base_model)
    #: the checksum comparisons still to run, by part ("data", "base", "parent", "t<t>/c<k>")
    later: dict[str, list[ChecksumCheck]] = field(default_factory=dict, repr=False)
    digests: BackgroundDigests | None = field(default=None, repr=False)

    @classmethod
    def read(cls, run: RunDirectory, verify_data: bool = True) -> RunInputs:
        """Read everything the analysis of ``run`` needs but the models' tensors, verify the small
        files now and start hashing the large ones (see the module docstring). Call ``close()``
        when done.

        Raises:
            RunDirectoryError: a file is missing, damaged, or does not match its checksum.
        """
        config = run.load_config()
        if not run.parent_final.is_dir():
            raise RunDirectoryError(f"{run.parent_final} is missing: the parent has not finished. Run the study "
                                    "(its command again resumes it) before analysing it.")
        folders = [*([run.data_dir] if verify_data else []), run.parent_final, run.base_model_dir]
        paths = [path for folder in folders if folder.is_dir() for path in files_under(folder)]
        for t in config["spawn_steps"]:
            for k in children_of(config, t):
                records = [run.perturbation_file(t, k), run.divergence_file(t, k)]
                final = run.child_final(t, k)
                paths += [path for path in records if path.is_file()] + (files_under(final) if final.is_dir() else [])
        # the small files first (they are checked now), then the large ones in the order they are needed
        paths.sort(key=lambda path: path.stat().st_size >= LATER_BYTES)
        digests = BackgroundDigests(paths)
        later: dict[str, list[ChecksumCheck]] = {}
        try:
            data = _verified_data(run, later.setdefault("data", []), digests) if verify_data else {}
            parent = _verified_final(run, run.parent_final, run.parent_dir, run.parent_remedy(),
                                     later=later.setdefault("parent", []), digests=digests)
            base = _verified_base(run, later.setdefault("base", []), digests) \
                if (run.parent_final / ADAPTER_CONFIG_NAME).is_file() else {}
            children = {}
            for t in config["spawn_steps"]:
                for k in children_of(config, t):
                    children[t, k] = _child_inputs(run, t, k, *child_group(config, t, k),
                                                   later=later.setdefault(f"t{t}/c{k}", []), digests=digests)
            parent_config = model_config_fingerprint(run.parent_final, run.parent_remedy())
        except BaseException:
            digests.close()
            raise
        return cls(config=config, data=data, parent=parent, parent_config=parent_config, children=children,
                   base=base, later=later, digests=digests)

    def verify(self, *parts: str) -> None:
        """Compare the large files of ``parts`` ("data", "base", "parent", "t<t>/c<k>") with their
        records, waiting for their checksums, and those of any other part already computed (a
        damage found in the background stops the analysis at once, not after the pairs before it).

        Raises:
            RunDirectoryError: a file does not match its checksum.
        """
        ready = [part for part, checks in self.later.items()
                 if self.digests is not None and all(self.digests.ready(check.file) for check in checks)]
        for part in dict.fromkeys([*parts, *ready]):
            for check in self.later.pop(part, []):
                check.run(self.digests)

    def verify_all(self) -> None:
        """Compare every large file with its record (before a report built from them is written).

        Raises:
            RunDirectoryError: a file does not match its checksum.
        """
        self.verify(*self.later)

    def close(self) -> None:
        """Stop the background hashing (what has not started is not read)."""
        if self.digests is not None:
            self.digests.close()

    def pair_fingerprint(self, arguments: dict[str, Any], a: str, b: str) -> str:
        """What a pair's measures depend on: the arguments, the run, the data and both models'
        verified files ("parent" or "t<t>/c<k>")."""
        return fingerprint({"arguments": arguments, "run": self.config["fingerprint"], "data": self.data,
                            "a": self._measured_files(a), "b": self._measured_files(b), **self._base()})

    def parent_fingerprint(self, arguments: dict[str, Any]) -> str:
        return fingerprint({"arguments": arguments, "run": self.config["fingerprint"], "data": self.data,
                            "parent": self._measured_files("parent"), **self._base()})

    def _base(self) -> dict[str, Any]:
        return {"base": self.base} if self.base else {}  # runs without one keep their fingerprints

    def _measured_files(self, name: str) -> dict[str, str]:
        """The checksums of what the measures of model ``name`` read: its files, but
        eval_results.json (the Trainer's wall times, read by no measure) and, for config.json, the
        configuration without the keys that change no function (see model_config_fingerprint)."""
        if name == "parent":
            files, configs = self.parent, self.parent_config
        else:
            child = next(c for c in self.children.values() if c.name == name)
            files, configs = child.checksums, child.config
        kept = {n: digest for n, digest in files.items() if not n.endswith((EVAL_RESULTS_NAME, CONFIG_JSON))}
        return {**kept, CONFIG_JSON: configs}


def model_config_fingerprint(final_dir, remedy: str) -> str:
    """The fingerprint of a final/config.json (a PEFT adapter's: adapter_config.json) without the
    keys that say where a model came from or that training fills in (use_cache,
    transformers_version...): the Trainer sets ``use_cache`` on the model it was built with and
    not on the models model_init builds later, so the same weights can come with two config.json
    files. PEFT writes the module sets of an adapter (``target_modules``...) as lists in the order
    of a Python set, which changes from one process to the next: they are compared as sets."""
    from ..training.identity import VOLATILE_CONFIG_KEYS

    adapter = final_dir / ADAPTER_CONFIG_NAME
    config = read_json(adapter if adapter.is_file() else final_dir / CONFIG_JSON, remedy)
    kept = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    for key in PEFT_MODULE_SETS:
        if isinstance(kept.get(key), list) and all(isinstance(v, str) for v in kept[key]):
            kept[key] = sorted(kept[key])
    return fingerprint(kept)


def _unverified(files: dict[str, Any], where: object, digests: BackgroundDigests | None) -> dict[str, str]:
    logger.warning("%s has no manifest (a run of an earlier hf_stability): its files cannot be checked for damage.",
                   where)
    return {name: digests.digest(path) if digests is not None else sha256_of(path) for name, path in files.items()}


def _verified_data(run: RunDirectory, later: list[ChecksumCheck], digests: BackgroundDigests) -> dict[str, str]:
    remedy = run.data_remedy()
    if not run.data_manifest.is_file():
        return _unverified(named_files(run.data_dir, ""), run.data_dir, digests) if run.data_dir.is_dir() else {}
    return verify(run.data_manifest, run.data_dir, lambda name: remedy, later=later, digests=digests)


def _verified_base(run: RunDirectory, later: list[ChecksumCheck], digests: BackgroundDigests) -> dict[str, str]:
    """The checksums of a PEFT study's base model, verified against its manifest."""
    remedy = run.base_model_remedy()
    if not run.base_model_dir.is_dir():
        raise RunDirectoryError(f"{run.base_model_dir} (the base model of this PEFT study) is missing. {remedy}",
                                path=run.base_model_dir)
    manifest = run.base_model_dir / MANIFEST_NAME
    if not manifest.is_file():
        return _unverified(named_files(run.base_model_dir, ""), run.base_model_dir, digests)
    return verify(manifest, run.base_model_dir, lambda name: remedy, later=later, digests=digests)


def _verified_final(run: RunDirectory, final, base, remedy: str, records: tuple[str, ...] = (),
                    later: list[ChecksumCheck] | None = None, digests: BackgroundDigests | None = None
                    ) -> dict[str, str]:
    """The checksums of a run's final/ files (and ``records``), verified against its manifest."""
    manifest = run.manifest_of(final)
    prefix = f"{final.name}/"
    if not manifest.is_file():
        files = named_files(final, final.name)
        files.update({name: base / name for name in records if (base / name).is_file()})
        return _unverified(files, final, digests)
    return verify(manifest, base, lambda name: remedy, only=lambda name: name.startswith(prefix) or name in records,
                  later=later, digests=digests)


def _child_inputs(run: RunDirectory, t: int, k: int, group: str, reference: str | None,
                  later: list[ChecksumCheck], digests: BackgroundDigests) -> ChildInputs:
    status = run.child_status(t, k)
    remedy = run.child_remedy(t, k)
    child = ChildInputs(spawn_step=t, child=k, status=status, group=group, reference=reference)
    if status == "pending":
        return child
    if status == "done":
        child.checksums = _verified_final(run, run.child_final(t, k), run.child_dir(t, k), remedy,
                                          records=(PERTURBATION_NAME, DIVERGENCE_NAME), later=later, digests=digests)
        child.config = model_config_fingerprint(run.child_final(t, k), remedy)
    else:
        child.diverged = read_json(run.diverged_file(t, k), remedy)
    if run.perturbation_file(t, k).is_file() or status == "done":
        record = read_json(run.perturbation_file(t, k), remedy)
        change = record.get("change_l2")
        if change is not None and (isinstance(change, bool) or not isinstance(change, (int, float))
                                   or not math.isfinite(change) or change < 0):
            raise RunDirectoryError(f"{run.perturbation_file(t, k)} has the change_l2 {change!r}, not a "
                                    f"non-negative number: the file is damaged. {remedy}")
        child.perturbation_l2 = float(change or 0.0)
        size = record.get("relative_size")
        child.relative_size = float(size) if isinstance(size, (int, float)) and math.isfinite(size) else None
    child.divergence = run.divergence(t, k)
    return child
