"""The divergence report card (a Hub model card, RUN/analysis/README.md) and the stability
section that StabilityMixin adds to the Trainer's own card."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..analysis.schema import Report
from ..model_cards import TEMPLATE
from ..run_directory import CARD_NAME, RunDirectory
from .findings import FLOOR_FACTOR, format_value, summary_paragraph
from .table import Column, render_table, summary_table

logger = logging.getLogger(__name__)

TAGS = ["hf-stability", "training-stability", "butterfly-effect", "linear-mode-connectivity"]
FIGURES = {
    "barrier_vs_size.png": "Loss and error barriers against the perturbation's size, one line per spawn step, with "
                           "the noise floor and the reference bands",
    "barrier_vs_spawn_step.png": "Loss and error barriers against the spawn step, with the noise floor",
    "aligned_vs_unaligned.png": "Barriers before and after permutation alignment",
    "divergence.png": "L2 distance to the parent during training, every child",
    "divergence_normalized.png": "The same distance divided by the L2 of each child's perturbation",
    "amplification_vs_spawn_step.png": "Amplification (final L2 / perturbation L2) of every child, by spawn step",
    "metric_along_alpha.png": "Eval loss and error (a language model: and perplexity) along the linear path",
    "cka_per_layer.png": "Linear CKA between parent and children, per layer",
}


def stability_section(report: Report, plots: dict[str, Path] | None = None, plots_prefix: str = "plots/") -> str:
    """Markdown: the summary in words, the table per spawn step (children beside the control)
    and the figures (linked under ``plots_prefix``)."""
    lines = ["## Summary", "", summary_paragraph(report), "", "## Results", "", summary_table(report, markdown=True)]
    lines += _size_table(report)
    lines += _floor_table(report)
    if plots:
        lines += ["", "## Figures", ""]
        for name, caption in FIGURES.items():
            if name in plots:
                lines += [f"![{caption}]({plots_prefix}{name})", "", f"*{caption}.*", ""]
    return "\n".join(lines).rstrip() + "\n"


def _size_table(report: Report) -> list[str]:
    """The eval loss and error barrier of every perturbation (by its size) and reference at
    every spawn step, beside the noise floor: the numbers of barrier_vs_size.png."""
    if len(report.groups()) < 2 and not report.run.references:
        return []
    steps = report.run.spawn_steps
    columns = [Column("children", left=True), Column("size")] + [Column(f"t = {t}") for t in steps]
    cells: dict[str, dict[int, Any]] = {}
    sizes: dict[str, list[float]] = {}
    for row in report.summary:
        if row.control:
            cells.setdefault("control (noise floor)", {})[row.spawn_step] = row.control
        if row.children:
            cells.setdefault(row.group, {})[row.spawn_step] = row.children
            if row.perturbation_size:
                sizes.setdefault(row.group, []).append(row.perturbation_size)
    out = []
    for metric in ("loss", "error"):
        key = f"{metric}_barrier_eval"
        rows = [[group, format_value(sum(sizes[group]) / len(sizes[group])) if group in sizes else "",
                 *[format_value(by_step[t].get(key)) if t in by_step else "" for t in steps]]
                for group, by_step in cells.items()]
        out += ["", f"Eval {metric} barrier by perturbation and spawn step (size: the perturbation's L2 over the L2 "
                "of an initialisation; mean +- std over children):", "", render_table(columns, rows, markdown=True)]
    return ["", "## Barrier against perturbation size", *out]


def _floor_table(report: Report) -> list[str]:
    """Every perturbed child beside its control, marked where all its figures lie within
    FLOOR_FACTOR x the floor (it cannot be told from the hardware's noise)."""
    pairs = [p for p in report.parent_child() if p.noise_floor is not None]
    if not pairs:
        return []
    explanation = (f"Each perturbed child's figures beside its control child's (in brackets). A child is "
                   f"*indistinguishable from the noise floor* when every figure is at most {FLOOR_FACTOR:g}x the "
                   "control's.")
    columns = [Column("spawn step"), Column("child"), Column("L2 to parent"), Column("loss barrier (eval)"),
               Column("error barrier (eval)"), Column("amplification"), Column("verdict", left=True)]
    rows = []
    for pair in pairs:
        figures = pair.noise_floor.figures
        cells = [f"{format_value(figures[k].value)} ({format_value(figures[k].floor)})"
                 for k in ("l2", "loss_barrier_eval", "error_barrier_eval")]
        verdict = "indistinguishable from the noise floor" if pair.noise_floor.indistinguishable else "beyond the floor"
        rows.append([str(pair.spawn_step), str(pair.child), *cells, format_value(pair.amplification), verdict])
    return ["", "## Children against the noise floor", "", explanation, "", render_table(columns, rows, markdown=True)]


def card_data(report: Report) -> Any:
    """YAML metadata: library, base model, datasets, tags and the parent's eval accuracy where
    the dataset is a named one."""
    from huggingface_hub import EvalResult, ModelCardData

    run = report.run
    base_model, dataset = run.base_model, run.dataset_name
    name = f"{base_model.split('/')[-1]}-stability-report" if base_model else "stability-report"
    results = None
    accuracy = report.parent["eval"].error
    if dataset and accuracy is not None:
        results = [EvalResult(
            task_type=run.task, dataset_type=dataset, dataset_name=dataset, dataset_split="eval",
            metric_type="accuracy", metric_name="parent eval accuracy",
            metric_value=round(1.0 - accuracy, 6),
        )]
    return ModelCardData(
        library_name="hf_stability",
        base_model=base_model,
        datasets=[dataset] if dataset else None,
        tags=TAGS + [run.task],
        pipeline_tag=run.task,
        model_name=name,
        eval_results=results,
    )


def build_card(report: Report, plots: dict[str, Path]) -> Any:
    """The report card (``huggingface_hub.ModelCard``) from the template in model_cards/."""
    from huggingface_hub import ModelCard

    settings = report.settings
    return ModelCard.from_template(
        card_data(report),
        template_path=str(TEMPLATE),
        base_model=report.run.base_model,
        generated_by=report.generated_by,
        section=stability_section(report, plots),
        alphas=settings.alphas,
        eval_samples=settings.eval_samples,
        floor_factor=f"{FLOOR_FACTOR:g}",
        alignment=settings.alignment.method,
        alignment_skipped=settings.alignment.skipped,
        pooling=settings.pooling,
        readout=settings.readout,
        head=settings.head.name,
        error_rule=settings.head.error,
        adapter=adapter_name(settings.peft.adapter) if settings.peft else None,
        peft_path=("between the merged weights, base + adapter" if settings.peft and settings.peft.path == "merged"
                   else "between the adapters"),
        schema_version=report.schema_version,
    )


#: How the card names PEFT's adapter types.
ADAPTER_NAMES = {"LORA": "LoRA", "IA3": "IA3", "LOHA": "LoHa", "LOKR": "LoKr", "ADALORA": "AdaLoRA"}


def adapter_name(peft_type: str) -> str:
    return ADAPTER_NAMES.get(peft_type, peft_type)


def add_stability_section(output_dir: Path) -> None:
    """Append the stability section to the Trainer's card ``output_dir/README.md`` when
    ``output_dir`` holds an analysed butterfly run (what ``push_to_hub`` uploads)."""
    from huggingface_hub import ModelCard

    from ..errors import ReportError
    from .load import load_report

    run = RunDirectory(output_dir)
    card_file = run.root / CARD_NAME  # the Trainer's own card, in its output_dir
    if not card_file.is_file() or not run.report_file.is_file():
        return
    try:
        report = load_report(run.root)
    except ReportError as err:
        logger.warning("The model card gets no stability section: %s", err)
        return
    plots = {p.name: p for p in sorted(run.plots_dir.glob("*.png"))}
    prefix = f"{run.plots_dir.relative_to(run.root).as_posix()}/"
    section = stability_section(report, plots, plots_prefix=prefix).replace("## ", "### ")
    card = ModelCard.load(card_file)
    card.data.tags = sorted(set(card.data.tags or []) | {"hf-stability", "training-stability"})
    card.text = card.text.rstrip() + "\n\n## Training stability (hf_stability)\n\n" + section
    card.save(card_file)
