"""ButterflyResult: what ``butterfly()`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..run_directory import ChildSummary


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


@dataclass
class ButterflyResult:
    """Where the run is and one summary row per child."""

    run_dir: Path
    max_steps: int
    parent_metrics: dict[str, float]
    children: list[ChildSummary] = field(default_factory=list)

    def format_table(self, metric: str | None = None) -> str:
        """A plain-text table: spawn step, child, final L2 to parent, the amplification (final L2 /
        L2 of the perturbation itself; n/a for the control) and the chosen eval metric (default:
        eval_accuracy where the Trainer computed it, else eval_loss, as a language model's)."""
        from ..report.table import Column, render_table

        if metric is None:
            metric = "eval_accuracy" if "eval_accuracy" in self.parent_metrics else "eval_loss"

        columns = [Column("spawn step"), Column("child", left=True), Column("final L2 to parent"),
                   Column("amplification"), Column(metric)]
        rows = [["-", "parent", _fmt(0.0), "", _fmt(self.parent_metrics.get(metric))]]
        for row in self.children:
            name = f"c{row.child} ({'control' if row.is_control else row.group})"
            if row.status == "diverged":
                name = f"c{row.child} DIVERGED"
            moved = row.perturbation_l2 is not None and row.final_l2 is not None and row.perturbation_l2 > 0
            amplification = f"{row.final_l2 / row.perturbation_l2:.3g}x" if moved else "n/a"
            rows.append([str(row.spawn_step), name, _fmt(row.final_l2), amplification,
                         _fmt(row.eval_metrics.get(metric))])
        return render_table(columns, rows)
