"""A sweep's report: the analysed run directories of several perturbation scales collected into
one ``sweep_report.json`` and one plot of barrier against spawn step, a line per scale."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from ..atomic_io import write_json
from .load import load_report
from .plots import _children_and_floor, _finish, _pyplot, _scale_small_values, _step_axis

SWEEP_SCHEMA_VERSION = 1
SWEEP_KEYS = ("l2", "aligned_l2", "loss_barrier_eval", "aligned_loss_barrier_eval", "error_barrier_eval")


def collect_sweep(runs: dict[float, str | Path], root: str | Path) -> dict[str, Any]:
    """One row per (scale, spawn step): the children's mean and std of each measure and the
    control's value (the noise floor). Run paths are stored relative to ``root``."""
    root = Path(root)
    rows, scales = [], sorted(runs)
    for scale in scales:
        report = load_report(runs[scale])
        for row in report.summary:
            entry: dict[str, Any] = {"scale": scale, "spawn_step": row.spawn_step, "num_children": row.num_children}
            for key in SWEEP_KEYS:
                stat = row.children.get(key)
                entry[key] = dataclasses.asdict(stat) if stat is not None else None  # the children's {mean, std, n}
                entry[f"floor_{key}"] = (row.control or {}).get(key)
            rows.append(entry)
    return {
        "schema_version": SWEEP_SCHEMA_VERSION,
        "scales": scales,
        "runs": {str(scale): Path(runs[scale]).resolve().relative_to(root.resolve()).as_posix() for scale in scales},
        "rows": rows,
    }


def plot_sweep(runs: dict[float, str | Path], path: Path) -> Path:
    """Eval loss barrier (children mean ± std) against spawn step, one line per scale, with each
    scale's control barrier dashed (the noise floor)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.get_cmap("viridis")
    all_steps: set[int] = set()
    values: list[float] = []
    for i, scale in enumerate(sorted(runs)):
        report = load_report(runs[scale])
        steps, stats, floors = _children_and_floor(report, "loss_barrier_eval")
        color = colors(i / max(1, len(runs) - 1))
        ax.errorbar(steps, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, color=color,
                    label=f"sigma = {scale:g}")
        if any(f is not None for f in floors):
            ax.plot(steps, [math.nan if f is None else f for f in floors], ls="--", lw=1, color=color, alpha=0.7)
        all_steps.update(steps)
        values += [m + sd for m, sd in stats] + [f for f in floors if f is not None]
    ax.plot([], [], ls="--", color="0.4", label="noise floor (control child, dashed)")
    ax.axhline(0, color="black", lw=0.6)
    _step_axis(ax, sorted(all_steps))
    ax.set_ylabel("eval loss barrier (nats)")
    _scale_small_values(ax, values, linthresh=1e-3)
    return _finish(fig, ax, path, "Loss barrier between parent and children, by spawn step and perturbation scale")


def write_sweep_report(runs: dict[float, str | Path], root: str | Path) -> tuple[Path, Path]:
    """Write ``root/sweep_report.json`` and ``root/barrier_vs_spawn_step_by_scale.png``."""
    root = Path(root)
    report_path = root / "sweep_report.json"
    write_json(report_path, collect_sweep(runs, root))
    return report_path, plot_sweep(runs, root / "barrier_vs_spawn_step_by_scale.png")
