#!/usr/bin/env python
"""A sweep of butterfly studies of a text classifier: spawn steps x perturbation scales x seeds
in one command. Each scale is one run directory OUTPUT_DIR/sigma-<scale> (its children are the
seeds: --num_children, each with its own perturbation seed; child 0 is the control), analysed
and reported as usual; the sweep then writes OUTPUT_DIR/sweep_report.json and
OUTPUT_DIR/barrier_vs_spawn_step_by_scale.png (barrier against spawn step, a line per scale).

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml \\
        recipes/butterfly_sweep.py recipes/configs/minilm_tweets_sweep.json
    python recipes/butterfly_sweep.py --output_dir runs/sweep --max_steps 300 --spawn_steps 0 10 100 \\
        --perturbation_scales 0.001 0.01 0.1 --num_children 3

Each scale trains its own parent (the same training: bitwise equal on CPU), so a killed sweep
resumes scale by scale. Arguments: TextModelArguments, TextDataArguments, SweepArguments,
StabilityArguments, RecipeAnalysisArguments and TrainingArguments.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from hf_stability import StabilityArguments
from hf_stability.errors import StudyArgumentsError
from hf_stability.report.sweep import write_sweep_report
from hf_stability.studies.recipe import RecipeAnalysisArguments, parse_args, run_study, setup_logging
from hf_stability.studies.text_classification import (
    TextDataArguments,
    TextModelArguments,
    build_text_classification_trainer,
)

logger = logging.getLogger(__name__)


@dataclass
class SweepArguments:
    """The scales of a sweep (spawn steps and seeds are StabilityArguments' spawn_steps and num_children)."""

    perturbation_scales: list[float] = field(
        default_factory=lambda: [0.001, 0.01, 0.1],
        metadata={"help": "One butterfly study per scale (replaces --perturbation_scale)."},
    )

    def __post_init__(self) -> None:
        if not self.perturbation_scales or len(set(self.perturbation_scales)) != len(self.perturbation_scales):
            raise StudyArgumentsError(
                f"perturbation_scales must be distinct, at least one; got {self.perturbation_scales}.")


#: What this recipe parses, from a config file or flags (in this order).
ARGUMENTS = (TextModelArguments, TextDataArguments, SweepArguments, StabilityArguments, RecipeAnalysisArguments,
             TrainingArguments)


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, sweep, stability, analysis, training = parse_args(HfArgumentParser(ARGUMENTS), argv)
    setup_logging(training)
    root = Path(training.output_dir)
    runs: dict[float, Path] = {}
    trainer = None
    for scale in sweep.perturbation_scales:
        run_training = copy.deepcopy(training)
        run_training.output_dir = str(root / f"sigma-{scale:g}")
        trainer = build_text_classification_trainer(model_args, data_args, replace(stability, perturbation_scale=scale),
                                                    run_training)
        runs[scale] = run_study(trainer, analysis).run_dir
    if analysis.analyze and trainer is not None and trainer.is_world_process_zero():
        report, plot = write_sweep_report(runs, root)
        logger.info("Sweep report: %s, plot: %s", report, plot)


if __name__ == "__main__":
    main()
