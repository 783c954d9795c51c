"""The report stage: analysis/report.json -> PNG plots -> model card -> Hub.

- ``write_report(run_dir)``: RUN/analysis/plots/*.png and RUN/analysis/README.md (the card).
- ``push_report(run_dir, repo_id)``: upload them (and, if asked, the final weights).
- ``stability_section(report)``: the Markdown section StabilityTrainer adds to its model card.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..atomic_io import atomic_path
from .card import build_card, stability_section
from .findings import spawn_findings, summary_paragraph
from .load import load_report
from .plots import render_plots
from .push import push_report


@dataclass
class ReportFiles:
    """Where ``write_report`` put the card and the figures."""

    card: Path
    plots_dir: Path
    plots: dict[str, Path]


def write_report(run_dir: str | Path) -> ReportFiles:
    """Render RUN/analysis/report.json into plots and a model card, next to it.

    Raises:
        ReportError: the run has no analysis, or its report is of another schema or incomplete.
        RunInUseError: another process is writing the run directory.
    """
    from ..run_lock import locked_run

    with locked_run(run_dir, "report"):
        return _write_report(run_dir)


def _write_report(run_dir: str | Path) -> ReportFiles:
    from ..run_directory import RunDirectory

    report = load_report(run_dir)
    run = RunDirectory(run_dir)
    run.own_folder(run.analysis_dir)
    plots = render_plots(report, run.own_folder(run.plots_dir))
    card = build_card(report, plots)
    path = run.card_file
    with atomic_path(path) as tmp:
        tmp.write_text(str(card), encoding="utf-8")
    return ReportFiles(card=path, plots_dir=run.plots_dir, plots=plots)


__all__ = [
    "ReportFiles",
    "build_card",
    "load_report",
    "push_report",
    "render_plots",
    "spawn_findings",
    "stability_section",
    "summary_paragraph",
    "write_report",
]
