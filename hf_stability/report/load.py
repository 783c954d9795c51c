"""Read a run's analysis/report.json as the typed Report, checking that this version can render it."""

from __future__ import annotations

from pathlib import Path

from ..analysis.schema import REPORT_SCHEMA_VERSION, Report
from ..errors import ReportError, RunDirectoryError
from ..run_directory import RunDirectory
from ..run_files import read_json


def load_report(run_dir: str | Path) -> Report:
    """``RUN/analysis/report.json``, checked: it exists, parses, has this version's schema and
    every field of the right type. Every failure says what to run.

    Raises:
        ReportError: no analysis, another schema version, or a damaged or edited report.
    """
    run = RunDirectory(run_dir)
    if not run.root.is_dir():
        raise ReportError(f"{run.root} is not a directory: pass the run directory of a butterfly study.")
    path = run.report_file
    if not path.is_file():
        raise ReportError(f"{run.root} has no analysis/report.json: run `hf-stability analyze {run.root}` first.")
    try:
        data = read_json(path, f"Run `hf-stability analyze {run.root}` again to write it anew.")
    except RunDirectoryError as err:
        raise ReportError(str(err)) from None
    version = data.get("schema_version")
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
            f"run `hf-stability analyze {run.root}` again to rewrite it."
        )
    return Report.from_dict(data, str(path))
