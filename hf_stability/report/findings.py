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
#: The reference children, in words.
REFERENCE_NAMES = {"init_seed": "children of another init seed", "data_order": "children of another data order"}


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
    group: str = "control"
    reference: str | None = None
    several_groups: bool = False  # the study has several perturbations: name this one

    @property
    def who(self) -> str:
        """These children, in words: "children spawned at step 10 (gaussian 0.01)"..."""
        if self.reference is not None:
            return f"{REFERENCE_NAMES.get(self.reference, self.reference)} spawned at step {self.spawn_step}"
        named = f" ({self.group})" if self.several_groups else ""
        return f"children spawned at step {self.spawn_step}{named}"

    def sentence(self, method: str | None) -> str:
        if self.barrier is None:
            return f"{self.who}: no finished child to measure"
        where = "end in another basin" if self.separated else "stay in the parent's basin"
        floor = "n/a" if self.floor is None else _fmt(self.floor)
        text = (
            f"{self.who} {where}: loss barrier {_fmt(self.barrier)} +- "
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
    several = len(report.groups()) > 1
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
            indistinguishable=row.indistinguishable_from_floor, group=row.group, reference=row.reference,
            several_groups=several,
        ))
    return found


def describe_perturbation(report: Report) -> str:
    """'Gaussian noise of sigma = 0.01 x each tensor's init std' and the like, one phrase per
    perturbation of the study (the reference children are named apart)."""
    scales: dict[str, list[float]] = {}  # the perturbations that differ only in scale, described once
    shown: dict[str, dict[str, Any]] = {}
    for by_child in report.run.perturbations.values():
        for child, c in by_child.items():
            if child not in report.run.references and child != f"c{report.run.control_child}":
                rest = repr(sorted((k, v) for k, v in c.items() if k not in ("scale", "seed")))
                shown.setdefault(rest, c)
                if c.get("scale") not in scales.setdefault(rest, []):
                    scales[rest].append(c.get("scale"))
    if not shown:
        return "no perturbation (control children only)"
    return "; ".join(_describe(c, scales[rest]) for rest, c in shown.items())


def _describe(c: dict[str, Any], scales: list[float]) -> str:
    kind = c.get("kind")
    listed = [f"{s:g}" for s in sorted(s for s in scales if s is not None)]
    scale = ", ".join(listed[:-1]) + " and " + listed[-1] if len(listed) > 1 else (listed[0] if listed else "n/a")
    if kind == "single_weight":
        return f"one weight moved by {scale} x its init std (random sign)"
    if kind == "gaussian":
        mode = {"init": "each tensor's init std", "param": "each tensor's current std", "absolute": "1"}.get(
            c.get("scale_mode"), c.get("scale_mode"))
        text = f"Gaussian noise of sigma = {scale} x {mode}"
    elif kind == "batch":
        text = f"a step along the loss gradient of another batch, sigma = {scale}"
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


def _step_sentence(t: int, findings: list[SpawnFinding]) -> str:
    """One spawn step of a study of several perturbations: how many end in another basin, their
    range of barriers, and the reference children's."""
    perturbed = [f for f in findings if f.reference is None and f.barrier is not None]
    floor = next((f.floor for f in findings if f.floor is not None), None)
    text = f"at step {t}, "
    if perturbed:
        low, high = min(f.barrier for f in perturbed), max(f.barrier for f in perturbed)
        text += (f"{sum(f.separated for f in perturbed)} of {len(perturbed)} perturbations end in another basin "
                 f"(loss barrier {_fmt(low)} to {_fmt(high)}, noise floor {_fmt(floor)})")
    else:
        text += "no finished perturbed child"
    for f in findings:
        if f.reference is not None and f.barrier is not None:
            text += f", {REFERENCE_NAMES[f.reference].removeprefix('children of ')} {_fmt(f.barrier)}"
    return text


def summary_paragraph(report: Report) -> str:
    """Two or three sentences a reader understands in a minute."""
    run = report.run
    steps = run.spawn_steps
    when = ", ".join(str(s) for s in steps[:-1]) + (" and " if len(steps) > 1 else "") + str(steps[-1])
    children = [child for by_child in run.perturbations.values() for child in by_child]
    perturbed = sum(1 for child in children if child not in run.references and child != f"c{run.control_child}")
    references = {kind: sum(1 for value in run.references.values() if value == kind) for kind in REFERENCE_NAMES}
    control = " and an unperturbed control per spawn step" if run.control_child is not None else ""
    method = report.settings.alignment.method
    method = None if method == "none" else method
    findings = spawn_findings(report)
    perturbation = (
        f"Perturbation: {describe_perturbation(report)}, at step{'s' if len(steps) > 1 else ''} {when} of "
        f"{run.max_steps}; {perturbed} perturbed child{'ren' if perturbed != 1 else ''} in all{control}."
    )
    if run.references:
        perturbation += (f" References: {references['init_seed']} of another init seed (spawn step 0, the same data "
                         f"order) and {references['data_order']} of another data order per spawn step (the same "
                         "initialisation).")
    if len(report.groups()) > 1 or run.references:
        sentences = [_step_sentence(t, [f for f in findings if f.spawn_step == t]) for t in steps]
    else:
        sentences = [f.sentence(method) for f in findings]
    lines = [perturbation, "Finding: " + "; ".join(sentences) + "."]
    if report.diverged:
        lines.append(f"{len(report.diverged)} child(ren) diverged (NaN or Inf) and are reported apart.")
    return "\n\n".join(lines)
