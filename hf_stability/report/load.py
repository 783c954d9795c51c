"""Read a run's analysis/report.json and check that this version can render it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..analysis.runner import REPORT_SCHEMA_VERSION
from ..errors import ReportError

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
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReportError(f"{path} is not valid JSON ({err}): run `hf-stability analyze {run_dir}` again.") from None
    if not isinstance(report, dict):
        raise ReportError(f"{path} is not a report (a JSON object was expected).")
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
    return report
