"""The report's figures (matplotlib, PNG), each drawn from report.json alone.

Every figure puts the children beside the control child (the noise floor), labels its axes
with units, and is saved with a tight bounding box so that nothing is clipped.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from ..analysis.schema import Pair, Report
from ..atomic_io import atomic_path
from .findings import summary_stat

DPI = 150


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _finish(fig: Any, ax: Any, path: Path, title: str) -> Path:
    """Title, legend, layout and the atomic save that every line plot ends with."""
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _perturbed(report: Report, spawn_step: int) -> list[Pair]:
    return report.perturbed(spawn_step)


def _children_and_floor(report: Report, key: str, group: str | None = None,
                        rows: list[Any] | None = None) -> tuple[list[int], list[tuple], list[float | None]]:
    """From the report's summary: spawn steps with perturbed children of ``group`` (default:
    the first perturbation), their (mean, std) of ``key`` and the control's value (the noise
    floor, None without a control). ``rows``: these summary rows instead."""
    if rows is None:
        groups = report.groups()
        group = group if group is not None else (groups[0] if groups else None)
        rows = [row for row in report.perturbation_rows() if row.group == group]
    stats = [_stat(row, key) for row in rows]
    return [row.spawn_step for row in rows], stats, [(row.control or {}).get(key) for row in rows]


def _stat(row: Any, key: str) -> tuple[float, float]:
    return tuple(float("nan") if v is None else v for v in summary_stat(row.children, key))


def _reference_bands(ax: Any, report: Report, key: str, steps_axis: bool) -> None:
    """The reference children's figures: another init seed as a band (mean ± std, spawn step 0)
    and another data order as a dashed line (by spawn step; on a size axis, one line per step)."""
    seeds = report.reference_rows("init_seed")
    if seeds:
        mean, std = _stat(seeds[0], key)
        if math.isfinite(mean):
            ax.axhspan(mean - std, mean + std, color="tab:blue", alpha=0.15)
            ax.axhline(mean, color="tab:blue", lw=1, label="another init seed (mean ± std)")
    orders = report.reference_rows("data_order")
    if orders and steps_axis:
        steps, stats, _ = _children_and_floor(report, key, rows=orders)
        ax.errorbar(steps, [m for m, _ in stats], yerr=[s for _, s in stats], color="tab:green", ls="--",
                    marker="s", capsize=3, label="another data order (mean ± std)")
    elif orders:
        colors = _step_colors(report)
        for row in orders:
            mean, _ = _stat(row, key)
            if math.isfinite(mean):
                ax.axhline(mean, color=colors[row.spawn_step], ls=":", lw=1.2)
        ax.plot([], [], color="0.3", ls=":", label="another data order at that spawn step (dotted)")


def _step_colors(report: Report) -> dict[int, Any]:
    steps = report.run.spawn_steps
    return dict(zip(steps, _pyplot().cm.viridis([i / max(1, len(steps) - 1) for i in range(len(steps))])))


def _scale_small_values(ax: Any, values: list[float], linthresh: float) -> None:
    """A symmetric-log y axis when the values span beyond ``linthresh``; otherwise a linear axis
    in scientific notation (a symlog axis over values all below its threshold labels badly)."""
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    if finite and max(finite) > 10 * linthresh:
        ax.set_yscale("symlog", linthresh=linthresh)
    else:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))


def _step_axis(ax: Any, steps: list[int]) -> None:
    ax.set_xlabel("spawn step t (optimizer steps)")
    if len(steps) > 2 and max(steps) > 20 * max(1, sorted(steps)[1]):
        linthresh = max(1, sorted(steps)[1])
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_xlim(min(steps) - 0.3 * linthresh, max(steps) * 1.15)
    ax.set_xticks(steps)
    ax.set_xticklabels([str(s) for s in steps])


METRICS = (("loss", "loss barrier (nats)"), ("error", "error barrier (fraction of judged entries)"))


def _no_rule(ax: Any, report: Report, metric: str) -> bool:
    """For a metric the head has no rule for (the error of a regression head): say so on the axes."""
    if metric != "error" or report.settings.head.error is not None:
        return False
    ax.text(0.5, 0.5, f"no error rule for a {report.settings.head.name} head", ha="center", va="center",
            transform=ax.transAxes)
    ax.set_axis_off()
    return True


def plot_barrier_vs_spawn_step(report: Report, path: Path) -> Path:
    """Eval loss and error barriers of the children (mean ± std) against the spawn step, a line
    per perturbation, with the control's barrier (the noise floor) as a band from zero and the
    reference children (another init seed, another data order) where the study has them."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    groups = report.groups()
    reds = plt.cm.autumn([i / max(1, len(groups)) for i in range(len(groups))]) if len(groups) > 1 else ["tab:red"]
    for ax, (metric, label) in zip(axes, METRICS):
        if _no_rule(ax, report, metric):
            continue
        key = f"{metric}_barrier_eval"
        all_steps = sorted({row.spawn_step for row in report.summary})
        floors = {row.spawn_step: (row.control or {}).get(key) for row in report.summary}
        if any(f is not None for f in floors.values()):
            floor = [max(floors[t] or 0.0, 0.0) for t in all_steps]
            ax.fill_between(all_steps, 0, floor, color="0.6", alpha=0.35, label="noise floor (control child)")
            ax.plot(all_steps, floor, color="0.4", lw=1)
        for color, group in zip(reds, groups):
            steps, stats, _ = _children_and_floor(report, key, group)
            name = "perturbed children" if len(groups) == 1 else group
            ax.errorbar(steps, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=4,
                        color=color, label=f"{name} (mean ± std)")
        _reference_bands(ax, report, key, steps_axis=True)
        ax.axhline(0, color="black", lw=0.6)
        if len(groups) > 1 or report.run.references:  # sizes over decades: a symmetric-log axis
            linthresh = 1e-4 if metric == "loss" else 1e-3
            _scale_small_values(ax, [_stat(row, key)[0] for row in report.summary if row.children], linthresh)
            if ax.get_yscale() == "symlog":
                ax.set_ylim(bottom=-linthresh)
        _step_axis(ax, all_steps)
        ax.set_ylabel(f"eval {label}")
        ax.set_title(f"Eval {metric} barrier, parent vs child")
        ax.legend(fontsize=8)
    fig.suptitle("Barrier on the linear path between parent and child, by spawn step")
    fig.tight_layout()
    return _save(fig, path)


def plot_barrier_vs_size(report: Report, path: Path) -> Path | None:
    """The paper's Figure 1: loss and error barriers (eval and train) against the size of the
    perturbation (its L2 over the L2 of an initialisation: from one weight to sigma 1), a line
    per spawn step, with the noise floor and the reference children's bands. None for a study
    of one perturbation without references (the card's table says it all), or of no known size."""
    rows = [row for row in report.perturbation_rows() if row.perturbation_size]
    if not rows or (len(report.groups()) < 2 and not report.run.references):
        return None
    plt = _pyplot()
    splits = ["eval", "train"] if any("loss_barrier_train" in row.children for row in rows) else ["eval"]
    fig, axes = plt.subplots(len(splits), 2, figsize=(13.5, 4.2 * len(splits)), squeeze=False)
    colors = _step_colors(report)
    for i, split in enumerate(splits):
        for ax, (metric, label) in zip(axes[i], METRICS):
            if _no_rule(ax, report, metric):
                continue
            key = f"{metric}_barrier_{split}"
            floor = [max((row.control or {}).get(key) or 0.0, 0.0) for row in report.summary if row.control]
            if floor:
                ax.axhspan(0, max(floor), color="0.6", alpha=0.35, label="noise floor (largest control barrier)")
            values = list(floor)
            for t in report.run.spawn_steps:
                mine = sorted((row for row in rows if row.spawn_step == t), key=lambda row: row.perturbation_size)
                for single in (False, True):  # noise as a line, one moved weight as stars
                    chosen = [row for row in mine if row.group.startswith("single_weight") == single]
                    if not chosen:
                        continue
                    stats = [_stat(row, key) for row in chosen]
                    values += [m + s for m, s in stats]
                    ax.errorbar([row.perturbation_size for row in chosen], [m for m, _ in stats],
                                yerr=[s for _, s in stats], marker="*" if single else "o", ms=11 if single else 6,
                                ls="none" if single else "-", capsize=3, color=colors[t],
                                label=None if single else f"t = {t}")
            if any(row.group.startswith("single_weight") for row in rows):
                ax.plot([], [], "*", color="0.3", ms=11, ls="none", label="one weight moved (star)")
            _reference_bands(ax, report, key, steps_axis=False)
            values += [_stat(row, key)[0] for row in report.summary if row.reference is not None and row.children]
            ax.axhline(0, color="black", lw=0.6)
            linthresh = 1e-4 if metric == "loss" else 1e-3
            _scale_small_values(ax, values, linthresh=linthresh)
            if ax.get_yscale() == "symlog":  # barriers are >= 0 but for rounding: no room for negative decades
                ax.set_ylim(bottom=-linthresh)
            ax.set_xscale("log")
            ax.set_xlabel("perturbation size: its L2 / the L2 of an initialisation")
            ax.set_ylabel(f"{split} {label}")
            ax.set_title(f"{split.capitalize()} {metric} barrier, parent vs child")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.79, 0.5), fontsize=8, title="spawn step",
               title_fontsize=8)
    fig.suptitle("Barrier against perturbation size, one line per spawn step (mean ± std over children)")
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    return _save(fig, path)


#: The y label of each metric along the path.
ALONG_PATH = {"loss": "eval loss (mean cross-entropy, nats)", "error": "eval error (fraction wrong)",
              "perplexity": "eval perplexity (exp of the mean next-token loss)"}


def plot_metric_along_alpha(report: Report, path: Path) -> Path:
    """Eval loss and error (and a language model's perplexity) along the linear path, mean over
    each spawn step's children."""
    plt = _pyplot()
    steps = report.run.spawn_steps
    colors = plt.cm.viridis([i / max(1, len(steps) - 1) for i in range(len(steps))])
    metrics = ["loss", "error"] + (["perplexity"] if report.settings.head.perplexity is not None else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2))
    for ax, metric in zip(axes, metrics):
        if _no_rule(ax, report, metric):
            continue
        for color, t in zip(colors, steps):
            pairs = _perturbed(report, t)
            if not pairs:
                continue
            alphas = pairs[0].barriers["eval"][metric].alphas
            curves = [p.barriers["eval"][metric].values for p in pairs]
            mean = [statistics.fmean(values) for values in zip(*curves)]
            ax.plot(alphas, mean, marker=".", color=color, label=f"t = {t}")
        ax.set_xlabel("interpolation alpha (0 = parent, 1 = child)")
        ax.set_ylabel(ALONG_PATH[metric])
        ax.set_title(f"Eval {metric} along the path (mean over children)")
        ax.legend(title="spawn step", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_divergence(report: Report, path: Path) -> Path:
    """L2 distance to the parent during training, for every child (controls dashed)."""
    plt = _pyplot()
    steps = report.run.spawn_steps
    colors = dict(zip(steps, plt.cm.viridis([i / max(1, len(steps) - 1) for i in range(len(steps))])))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labelled: set[Any] = set()
    positive = [v for d in report.divergence for v in d.l2 if v > 0]
    for d in report.divergence:
        if not d.steps:
            continue
        key = "control" if d.is_control else d.spawn_step
        label = None if key in labelled else ("control children" if d.is_control else f"spawned at t = {key}")
        labelled.add(key)
        ax.plot(d.steps, d.l2, color="0.3" if d.is_control else colors[d.spawn_step],
                ls="--" if d.is_control else "-", lw=1.2, label=label)
    if positive:
        ax.set_yscale("symlog", linthresh=min(positive))
    ax.set_xlabel("training step")
    ax.set_ylabel("L2 distance to the parent (parameter space)")
    return _finish(fig, ax, path, "Divergence of every child from its parent")


def plot_amplification(report: Report, path: Path) -> Path | None:
    """Amplification (final L2 to the parent / L2 of the perturbation itself) of every perturbed
    child against its spawn step, with the mean per step. None when no child changed a weight."""
    plt = _pyplot()
    points = [(p.spawn_step, p.amplification) for p in report.parent_child()
              if not p.is_control and p.reference is None and p.amplification]
    if not points:
        return None
    steps = sorted({t for t, _ in points})
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.scatter([t for t, _ in points], [a for _, a in points], color="tab:red", alpha=0.6, s=18, label="child")
    means = [statistics.fmean(a for s, a in points if s == t) for t in steps]
    ax.plot(steps, means, color="tab:red", lw=1.5, label="mean over children")
    ax.axhline(1.0, color="0.4", ls="--", lw=1, label="1 (the perturbation neither grew nor shrank)")
    ax.set_yscale("log")
    _step_axis(ax, steps)
    ax.set_ylabel("amplification: final L2 / perturbation L2")
    return _finish(fig, ax, path, "How much training amplified the perturbation, by spawn step")


def plot_divergence_normalized(report: Report, path: Path) -> Path | None:
    """Each perturbed child's divergence trajectory divided by the L2 of its perturbation:
    1 at the spawn step, then how training grows or shrinks the difference."""
    plt = _pyplot()
    curves = [d for d in report.divergence if not d.is_control and d.perturbation_l2 and d.steps
              and d.reference is None]
    if not curves:
        return None
    steps = report.run.spawn_steps
    colors = dict(zip(steps, plt.cm.viridis([i / max(1, len(steps) - 1) for i in range(len(steps))])))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labelled: set[int] = set()
    for d in curves:  # (the first point is right after the perturbation: 1 for a weight perturbation)
        t = d.spawn_step
        ax.plot(d.steps, [v / d.perturbation_l2 for v in d.l2], color=colors[t], lw=1.2,
                label=None if t in labelled else f"spawned at t = {t}")
        labelled.add(t)
    ax.axhline(1.0, color="0.4", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("L2 to the parent / L2 of the perturbation")
    return _finish(fig, ax, path, "Divergence normalised by the perturbation's size")


def plot_cka_heatmap(report: Report, path: Path) -> Path | None:
    """Mean linear CKA between parent and children per layer (rows: spawn steps)."""
    plt = _pyplot()
    steps = [t for t in report.run.spawn_steps if _perturbed(report, t)]
    if not steps:
        return None
    layers = _perturbed(report, steps[0])[0].cka.layers
    grid = []
    for t in steps:
        rows = [p.cka.values for p in _perturbed(report, t)]
        grid.append([statistics.fmean(v) if (v := [r[i] for r in rows if r[i] is not None]) else float("nan")
                     for i in range(len(layers))])
    fig, ax = plt.subplots(figsize=(max(6.5, 0.8 * len(layers) + 3), max(3.2, 0.6 * len(steps) + 2.2)))
    lowest = min(0.0, *[v for r in grid for v in r if not math.isnan(v)])
    image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=lowest, vmax=1.0)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            defined = not math.isnan(value)  # NaN: the layer does not vary over examples (CKA undefined)
            ax.text(j, i, f"{value:.3f}" if defined else "n/a", ha="center", va="center", fontsize=7,
                    color="white" if defined and value < 0.6 else "black")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=45, ha="right")
    ax.set_yticks(range(len(steps)))
    ax.set_yticklabels([f"t = {t}" for t in steps])
    ax.set_xlabel("layer (hidden states after it)")
    ax.set_ylabel("spawn step")
    ax.set_title(f"Linear CKA, parent vs children\n({report.settings.pooling} pooling, mean over children)")
    fig.colorbar(image, ax=ax, label="linear CKA (1 = identical)")
    fig.tight_layout()
    return _save(fig, path)


def plot_aligned_vs_unaligned(report: Report, path: Path) -> Path | None:
    """Eval loss barrier before and after permutation alignment, per spawn step."""
    method = report.settings.alignment.method
    if method == "none":
        return None
    plt = _pyplot()
    steps, before, floors = _children_and_floor(report, "loss_barrier_eval")
    _, after, _ = _children_and_floor(report, "aligned_loss_barrier_eval")
    x = list(range(len(steps)))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(steps) + 2), 4.2))
    width = 0.38
    ax.bar([i - width / 2 for i in x], [m for m, _ in before], width, yerr=[s for _, s in before], capsize=4,
           color="tab:red", label="unaligned")
    ax.bar([i + width / 2 for i in x], [m for m, _ in after], width, yerr=[s for _, s in after], capsize=4,
           color="tab:blue", label=f"after {method} matching")
    for i, floor in zip(x, floors):
        if floor is not None:
            ax.hlines(floor, i - width, i + width, color="black", lw=1.5, label="noise floor" if i == 0 else None)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x)
    ax.set_xticklabels([f"t = {t}" for t in steps])
    ax.set_xlabel("spawn step")
    ax.set_ylabel("eval loss barrier (nats)")
    return _finish(fig, ax, path, "Barrier before and after permutation alignment\n(mean ± std over children)")


PLOTS = {
    "barrier_vs_spawn_step.png": plot_barrier_vs_spawn_step,
    "barrier_vs_size.png": plot_barrier_vs_size,
    "metric_along_alpha.png": plot_metric_along_alpha,
    "divergence.png": plot_divergence,
    "divergence_normalized.png": plot_divergence_normalized,
    "amplification_vs_spawn_step.png": plot_amplification,
    "cka_per_layer.png": plot_cka_heatmap,
    "aligned_vs_unaligned.png": plot_aligned_vs_unaligned,
}


def render_plots(report: Report, folder: str | Path) -> dict[str, Path]:
    """Draw every figure that the report has data for into ``folder``; name -> path."""
    folder = Path(folder)
    drawn = {}
    for name, draw in PLOTS.items():
        path = draw(report, folder / name)
        if path is not None:
            drawn[name] = path
    return drawn
