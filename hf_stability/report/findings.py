"""The report in words, built from the numbers: what was perturbed, when, how much, and what
became of the children at each spawn step.

A spawn step's children "end in another basin" when their mean eval loss barrier exceeds both
twice the noise floor (the control child's barrier) and 1% of the parent's eval loss; otherwise
they "stay in the parent's basin". The same 2x-floor rule marks figures that cannot be told
from the hardware's noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..analysis.noise_floor import FLOOR_FACTOR
from ..analysis.schema import Report, Stat

RELATIVE_BARRIER = 0.01


@dataclass
class SpawnFinding:
    """What the children of one spawn step show, next to their control (the noise floor)."""

    spawn_step: int
    num_children: int
    barrier: float | None
    barrier_std: float | None
    floor: float | None
    aligned: float | None
    aligned_std: float | None
    l2: float | None
    separated: bool
    indistinguishable: int | None = None

    def sentence(self, method: str | None) -> str:
        if self.barrier is None:
            return f"children spawned at step {self.spawn_step}: no finished perturbed child to measure"
        where = "end in another basin" if self.separated else "stay in the parent's basin"
        floor = "n/a" if self.floor is None else _fmt(self.floor)
        text = (
            f"children spawned at step {self.spawn_step} {where}: loss barrier {_fmt(self.barrier)} +- "
            f"{_fmt(self.barrier_std)} against a noise floor of {floor}"
        )
        if self.aligned is not None and method:
            text += f"; after {method} matching {_fmt(self.aligned)} +- {_fmt(self.aligned_std)}"
        if self.indistinguishable:
            text += (f"; {self.indistinguishable} of {self.num_children} cannot be told from the noise floor "
                     f"(every figure within {FLOOR_FACTOR:g}x the control's)")
        return text


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    return f"{value:.2g}" if abs(value) < 0.01 else f"{value:.2f}"


def summary_stat(stats: dict[str, Stat], key: str) -> tuple[float | None, float | None]:
    """(mean, std) of ``key`` in a summary row's ``children`` statistics; (None, None) if absent."""
    entry = stats.get(key)
    return (entry.mean, entry.std) if entry is not None else (None, None)


def format_value(value: Any) -> str:
    """A table cell: a number, a children's statistic as "mean +- std", or n/a."""
    if isinstance(value, Stat):
        return f"{value.mean:.4g} +- {value.std:.2g}" if value.mean is not None else "n/a"
    return f"{value:.4g}" if value is not None else "n/a"


def spawn_findings(report: Report) -> list[SpawnFinding]:
    parent_loss = report.parent["eval"].loss
    found = []
    for row in report.summary:
        barrier, std = summary_stat(row.children, "loss_barrier_eval")
        aligned, aligned_std = summary_stat(row.children, "aligned_loss_barrier_eval")
        l2, _ = summary_stat(row.children, "l2")
        floor = (row.control or {}).get("loss_barrier_eval")
        threshold = max(FLOOR_FACTOR * max(floor or 0.0, 0.0), RELATIVE_BARRIER * parent_loss)
        found.append(SpawnFinding(
            spawn_step=row.spawn_step, num_children=row.num_children, barrier=barrier, barrier_std=std,
            floor=floor, aligned=aligned, aligned_std=aligned_std, l2=l2,
            separated=barrier is not None and barrier > threshold,
            indistinguishable=row.indistinguishable_from_floor,
        ))
    return found


def describe_perturbation(report: Report) -> str:
    """'Gaussian noise of sigma = 0.01 x each tensor's init std' and the like, from the first
    perturbed child's configuration."""
    configs = [c for by_child in report.run.perturbations.values() for c in by_child.values()
               if c.get("kind") != "none"]
    if not configs:
        return "no perturbation (control children only)"
    c = configs[0]
    kind = c.get("kind")
    scale = c.get("scale")
    if kind == "gaussian":
        mode = {"init": "each tensor's init std", "param": "each tensor's current std", "absolute": "1"}.get(
            c.get("scale_mode"), c.get("scale_mode"))
        text = f"Gaussian noise of sigma = {scale:g} x {mode}"
    elif kind == "batch":
        text = f"a step along the loss gradient of another batch, sigma = {scale:g}"
    elif kind == "data_order":
        text = "another data order after the spawn step"
    elif kind == "dropout":
        text = "another dropout seed after the spawn step"
    else:
        text = str(kind)
    if c.get("num_entries"):
        text += f", on {c['num_entries']} weight{'s' if c['num_entries'] > 1 else ''}"
    elif c.get("fraction") is not None:
        text += f", on a fraction {c['fraction']:g} of the weights"
    if c.get("include"):
        text += f", tensors matching {c['include']}"
    if c.get("exclude"):
        text += f", excluding {c['exclude']}"
    return text


def summary_paragraph(report: Report) -> str:
    """Two or three sentences a reader understands in a minute."""
    run = report.run
    steps = run.spawn_steps
    when = ", ".join(str(s) for s in steps[:-1]) + (" and " if len(steps) > 1 else "") + str(steps[-1])
    perturbed = len([k for k in run.children if k != run.control_child])
    control = " and an unperturbed control" if run.control_child is not None else ""
    method = report.settings.alignment.method
    method = None if method == "none" else method
    findings = spawn_findings(report)
    perturbation = (
        f"Perturbation: {describe_perturbation(report)}, at step{'s' if len(steps) > 1 else ''} {when} of "
        f"{run.max_steps}; {perturbed} perturbed child{'ren' if perturbed != 1 else ''}{control} per spawn step."
    )
    lines = [perturbation, "Finding: " + "; ".join(f.sentence(method) for f in findings) + "."]
    if report.diverged:
        lines.append(f"{len(report.diverged)} child(ren) diverged (NaN or Inf) and are reported apart.")
    return "\n\n".join(lines)
