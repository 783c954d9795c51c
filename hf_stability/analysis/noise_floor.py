"""The noise floor: how far the unperturbed control child ends from its parent.

The control child trains from the same spawn checkpoint on the same data without a
perturbation, so its distance and barriers are what the hardware alone produces (zero on a CPU
or with ``deterministic=True`` on one GPU). A perturbed child's figure is *indistinguishable
from the noise floor* when it is at most ``FLOOR_FACTOR`` times the control's.
"""

from __future__ import annotations

from typing import Any

FLOOR_FACTOR = 2.0
#: The figures of a pair that are compared with the control's.
FLOOR_FIGURES = ("l2", "loss_barrier_eval", "error_barrier_eval")


def within_floor(value: float | None, floor: float | None) -> bool | None:
    """``value`` <= FLOOR_FACTOR x ``floor`` (a negative floor counts as 0); None when either is missing."""
    if value is None or floor is None:
        return None
    return value <= FLOOR_FACTOR * max(floor, 0.0)


def compare_with_floor(
    child: dict[str, float | None], control: dict[str, float | None] | None
) -> dict[str, Any] | None:
    """Each of FLOOR_FIGURES of a child beside the control's, and whether all of them lie within
    FLOOR_FACTOR x the floor. None without a control child."""
    if control is None:
        return None
    figures = {
        key: {"value": child.get(key), "floor": control.get(key),
              "within": within_floor(child.get(key), control.get(key))}
        for key in FLOOR_FIGURES
    }
    known = [f["within"] for f in figures.values() if f["within"] is not None]
    return {"factor": FLOOR_FACTOR, "figures": figures, "indistinguishable": bool(known) and all(known)}
