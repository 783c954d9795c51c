"""The demo: fine-tune the packaged MiniLM on tweet sentiment and run a butterfly study."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from ..enums import ExplicitEnum
from ..errors import StudyArgumentsError
from ..training import ButterflyResult, StabilityArguments
from .text_classification import TextDataArguments, TextModelArguments, build_text_classification_trainer

#: Sizes of the demo; "small" finishes in under 10 minutes on 2 CPU cores.
PRESETS = {
    "small": dict(train=1024, eval=512, max_length=48, max_steps=40, batch=16, spawn=[0, 10, 25], children=2, every=5),
    "medium": dict(train=4096, eval=1024, max_length=64, max_steps=200, batch=32, spawn=[0, 25, 100, 150],
                   children=3, every=10),
    "large": dict(train=None, eval=None, max_length=64, max_steps=1000, batch=32, spawn=[0, 50, 200, 500, 800],
                  children=4, every=25),
}


class DemoSize(ExplicitEnum):
    """The demo's presets (PRESETS): small finishes in under 10 minutes on 2 CPU cores."""

    __label__ = "demo size"
    __error__ = StudyArgumentsError
    SMALL = "small"
    MEDIUM = "medium"
    LARGE = "large"


@dataclass
class DemoArguments:
    """Options of ``hf-stability demo``; unset values come from the ``size`` preset."""

    output_dir: str = field(default="runs/demo", metadata={"help": "Run directory."})
    size: DemoSize = field(default=DemoSize.SMALL, metadata={"help": "Preset (small: < 10 min on 2 CPUs)."})
    spawn_steps: list[int] | None = field(default=None, metadata={"help": "Override the preset's spawn steps."})
    num_children: int | None = field(default=None, metadata={"help": "Perturbed children per spawn step."})
    perturbation_scale: float = field(default=0.01, metadata={"help": "sigma of the Gaussian perturbation."})
    max_steps: int | None = field(default=None, metadata={"help": "Override the preset's number of steps."})
    learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Peak learning rate (linear decay, 10% warm-up). At 1e-3 early perturbations grow several "
                          "times over the 40 steps; at 1e-4 fine-tuning is stable and they only persist."},
    )
    seed: int = field(default=42, metadata={"help": "Training seed (classifier init, dropout, data order)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a run of another configuration in output_dir."})
    analyze: bool = field(default=True, metadata={"help": "End with the analysis and the report (plots, card)."})

    def __post_init__(self) -> None:
        self.size = DemoSize(self.size)


def demo_arguments(
    demo: DemoArguments,
) -> tuple[TextModelArguments, TextDataArguments, StabilityArguments, TrainingArguments]:
    """The demo's four argument dataclasses, from its preset and overrides."""
    preset = PRESETS[demo.size.value]
    max_steps = demo.max_steps or preset["max_steps"]
    model = TextModelArguments(model_name_or_path="minilm")
    data = TextDataArguments(
        dataset="tweets",
        max_train_samples=preset["train"],
        max_eval_samples=preset["eval"],
        max_length=preset["max_length"],
    )
    stability = StabilityArguments(
        spawn_steps=demo.spawn_steps or preset["spawn"],
        num_children=demo.num_children if demo.num_children is not None else preset["children"],
        perturbation_scale=demo.perturbation_scale,
        divergence_every=preset["every"],
        overwrite_run=demo.overwrite,
    )
    training = TrainingArguments(
        output_dir=demo.output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=preset["batch"],
        per_device_eval_batch_size=128,
        learning_rate=demo.learning_rate,
        warmup_steps=max(1, max_steps // 10),
        weight_decay=0.01,
        seed=demo.seed,
        save_strategy="no",
        logging_steps=preset["every"],
        report_to="none",
        dataloader_num_workers=0,
    )
    return model, data, stability, training


def run_demo(demo: DemoArguments) -> ButterflyResult:
    return build_text_classification_trainer(*demo_arguments(demo)).butterfly()


#: Analyzer settings of the demo: enough examples for stable barriers, quick on 2 CPU cores.
DEMO_ANALYSIS = {"eval_samples": 128, "train_samples": 64, "alphas": 5, "batch_size": 64}


def analyze_demo(run_dir: Path) -> tuple[Any, Any]:
    """Analyze the demo's run directory and render its report; returns (Report, ReportFiles)."""
    from ..analysis import AnalyzeArguments, analyze_run
    from ..report import write_report

    report = analyze_run(run_dir, AnalyzeArguments(**DEMO_ANALYSIS))
    return report, write_report(run_dir)
