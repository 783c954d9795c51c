"""Read a run's analysis/report.json and check that this version can render it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..analysis.runner import REPORT_SCHEMA_VERSION
from ..errors import ReportError, RunDirectoryError
from ..run_files import read_json

# Fields the report stage reads, as "section.field" (a section alone: the section must exist).
REQUIRED_FIELDS = (
    "schema_version",
    "run.spawn_steps",
    "run.max_steps",
    "run.children",
    "run.control_child",
    "run.perturbations",
    "run.task",
    "settings.alphas",
    "settings.alignment",
    "settings.eval_samples",
    "parent.eval",
    "pairs",
    "summary",
    "divergence",
    "diverged",
)


# Fields that hold numbers (or null), as dotted paths; "*" is every item of a list or value of an object.
NUMERIC_FIELDS = (
    "run.max_steps", "run.spawn_steps.*", "settings.alphas", "settings.eval_samples",
    "parent.*.loss", "parent.*.error",
    "pairs.*.spawn_step", "pairs.*.child", "pairs.*.perturbation_l2", "pairs.*.amplification", "pairs.*.disagreement",
    "pairs.*.l2.l2", "pairs.*.l2.relative", "pairs.*.cka.values.*",
    "pairs.*.barriers.*.*.barrier", "pairs.*.barriers.*.*.values.*", "pairs.*.barriers.*.*.alphas.*",
    "pairs.*.barriers.*.*.endpoint_a", "pairs.*.barriers.*.*.endpoint_b",
    "pairs.*.aligned.l2.l2", "pairs.*.aligned.barriers.*.*.barrier", "pairs.*.aligned.barriers.*.*.values.*",
    "pairs.*.noise_floor.figures.*.value", "pairs.*.noise_floor.figures.*.floor",
    "summary.*.spawn_step", "summary.*.num_children", "summary.*.control.*", "summary.*.children.*.mean",
    "summary.*.children.*.std", "divergence.*.spawn_step", "divergence.*.steps.*", "divergence.*.l2.*",
)


def _values_at(node: Any, keys: list[str], where: str) -> list[tuple[str, Any]]:
    """(dotted path, value) of every node that ``keys`` reaches from ``node`` (missing: none)."""
    if not keys:
        return [(where, node)]
    key, rest = keys[0], keys[1:]
    if key == "*":
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        return [found for k, child in items for found in _values_at(child, rest, f"{where}.{k}")]
    if isinstance(node, dict) and key in node:
        return _values_at(node[key], rest, f"{where}.{key}")
    return []


def _check_numbers(report: dict[str, Any], path: Path, run_dir: Path) -> None:
    for dotted in NUMERIC_FIELDS:
        for where, value in _values_at(report, dotted.split("."), ""):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ReportError(
                    f"{path}: the field {where.lstrip('.')!r} holds {value!r}, not a number: the file was edited or "
                    f"damaged. Run `hf-stability analyze {run_dir} --reanalyze` to write it again."
                )


def report_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "analysis" / "report.json"


def load_report(run_dir: str | Path) -> dict[str, Any]:
    """``RUN/analysis/report.json``, checked: it exists, parses, has this version's schema and
    every field the report stage reads. Every failure says what to run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory: pass the run directory of a butterfly study.")
    path = report_path(run_dir)
    if not path.is_file():
        raise ReportError(f"{run_dir} has no analysis/report.json: run `hf-stability analyze {run_dir}` first.")
    try:
        report = read_json(path, f"Run `hf-stability analyze {run_dir}` again to write it anew.")
    except RunDirectoryError as err:
        raise ReportError(str(err)) from None
    version = report.get("schema_version")
    if not isinstance(version, int):
        raise ReportError(f"{path} has no schema_version: it was not written by `hf-stability analyze`.")
    if version > REPORT_SCHEMA_VERSION:
        raise ReportError(
            f"{path} has schema version {version}, newer than this hf_stability reads ({REPORT_SCHEMA_VERSION}): "
            "upgrade hf_stability (pip install -U hf_stability)."
        )
    if version < REPORT_SCHEMA_VERSION:
        raise ReportError(
            f"{path} has the older schema version {version} (this hf_stability reads {REPORT_SCHEMA_VERSION}): "
            f"run `hf-stability analyze {run_dir}` again to rewrite it."
        )
    for dotted in REQUIRED_FIELDS:
        node: Any = report
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                raise ReportError(
                    f"{path} lacks the field {dotted!r}: the file is incomplete or was edited. Run "
                    f"`hf-stability analyze {run_dir}` again."
                )
            node = node[key]
    _check_numbers(report, path, run_dir)
    return report
