"""The divergence report card (a Hub model card, README.md) and the stability section that
StabilityTrainer adds to the Trainer's own card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .findings import FLOOR_FACTOR, format_value, spawn_findings, summary_paragraph

TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "divergence_report.md"
TAGS = ["hf-stability", "training-stability", "butterfly-effect", "linear-mode-connectivity"]
FIGURES = {
    "barrier_vs_spawn_step.png": "Loss and error barriers against the spawn step, with the noise floor",
    "aligned_vs_unaligned.png": "Barriers before and after permutation alignment",
    "divergence.png": "L2 distance to the parent during training, every child",
    "divergence_normalized.png": "The same distance divided by the L2 of each child's perturbation",
    "amplification_vs_spawn_step.png": "Amplification (final L2 / perturbation L2) of every child, by spawn step",
    "metric_along_alpha.png": "Eval loss and error along the linear path",
    "cka_per_layer.png": "Linear CKA between parent and children, per layer",
}


def stability_section(report: dict[str, Any], plots: dict[str, Path] | None = None, plots_prefix: str = "plots/") -> str:
    """Markdown: the summary in words, the table per spawn step (children beside the control)
    and the figures (linked under ``plots_prefix``)."""
    aligned = report["settings"]["alignment"]["method"] != "none"
    header = ["spawn step", "who", "L2 to parent", "loss barrier (eval)", "error barrier (eval)"]
    keys = ["l2", "loss_barrier_eval", "error_barrier_eval"]
    if aligned:
        header.append("loss barrier after alignment")
        keys.append("aligned_loss_barrier_eval")
    header += ["amplification", "disagreement"]
    keys += ["amplification", "disagreement"]
    lines = ["## Summary", "", summary_paragraph(report), "", "## Results", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    separated = {f.spawn_step: f.separated for f in spawn_findings(report)}
    for row in report["summary"]:
        if row["control"]:
            lines.append(f"| {row['spawn_step']} | control (noise floor) | "
                         + " | ".join(format_value(row["control"].get(k)) for k in keys) + " |")
        if row["children"]:
            verdict = "another basin" if separated.get(row["spawn_step"]) else "same basin"
            lines.append(f"| {row['spawn_step']} | {row['num_children']} children ({verdict}) | "
                         + " | ".join(format_value(row["children"].get(k)) for k in keys) + " |")
    lines += _floor_table(report)
    if plots:
        lines += ["", "## Figures", ""]
        for name, caption in FIGURES.items():
            if name in plots:
                lines += [f"![{caption}]({plots_prefix}{name})", "", f"*{caption}.*", ""]
    return "\n".join(lines).rstrip() + "\n"


def _floor_table(report: dict[str, Any]) -> list[str]:
    """Every perturbed child beside its control, marked where all its figures lie within
    FLOOR_FACTOR x the floor (it cannot be told from the hardware's noise)."""
    pairs = [p for p in report["pairs"] if p["kind"] == "parent-child" and p.get("noise_floor")]
    if not pairs:
        return []
    explanation = (f"Each perturbed child's figures beside its control child's (in brackets). A child is "
                   f"*indistinguishable from the noise floor* when every figure is at most {FLOOR_FACTOR:g}x the "
                   "control's.")
    header = "| spawn step | child | L2 to parent | loss barrier (eval) | error barrier (eval) | amplification | verdict |"
    lines = ["", "## Children against the noise floor", "", explanation, "", header, "|---|---|---|---|---|---|---|"]
    for pair in pairs:
        figures = pair["noise_floor"]["figures"]
        cells = [f"{format_value(figures[k]['value'])} ({format_value(figures[k]['floor'])})"
                 for k in ("l2", "loss_barrier_eval", "error_barrier_eval")]
        verdict = "indistinguishable from the noise floor" if pair["noise_floor"]["indistinguishable"] else "beyond the floor"
        lines.append(f"| {pair['spawn_step']} | {pair['child']} | " + " | ".join(cells)
                     + f" | {format_value(pair.get('amplification'))} | {verdict} |")
    return lines


def card_data(report: dict[str, Any]) -> Any:
    """YAML metadata: library, base model, datasets, tags and the parent's eval accuracy where
    the dataset is a named one."""
    from huggingface_hub import EvalResult, ModelCardData

    run = report["run"]
    base_model, dataset = run.get("base_model"), run.get("dataset_name")
    name = f"{base_model.split('/')[-1]}-stability-report" if base_model else "stability-report"
    results = None
    if dataset:
        results = [EvalResult(
            task_type=run["task"], dataset_type=dataset, dataset_name=dataset, dataset_split="eval",
            metric_type="accuracy", metric_name="parent eval accuracy",
            metric_value=round(1.0 - report["parent"]["eval"]["error"], 6),
        )]
    return ModelCardData(
        library_name="hf_stability",
        base_model=base_model,
        datasets=[dataset] if dataset else None,
        tags=TAGS + [run["task"]],
        pipeline_tag=run["task"],
        model_name=name,
        eval_results=results,
    )


def build_card(report: dict[str, Any], plots: dict[str, Path]) -> Any:
    """The report card (``huggingface_hub.ModelCard``) from the template in model_cards/."""
    from huggingface_hub import ModelCard

    settings = report["settings"]
    return ModelCard.from_template(
        card_data(report),
        template_path=str(TEMPLATE),
        base_model=report["run"].get("base_model"),
        generated_by=report["generated_by"],
        section=stability_section(report, plots),
        alphas=settings["alphas"],
        eval_samples=settings["eval_samples"],
        floor_factor=f"{FLOOR_FACTOR:g}",
        alignment=settings["alignment"]["method"],
        pooling=settings.get("pooling", "cls"),
        schema_version=report["schema_version"],
    )
