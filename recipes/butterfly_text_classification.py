#!/usr/bin/env python
"""Butterfly study of a text classifier, in the style of transformers' run_glue.py: fine-tune a
BERT-family model (default: the packaged MiniLM) on a labelled text dataset (default: the
packaged tweets), spawn perturbed children and a control at the spawn steps, then analyze the run
directory and render its report (RUN/analysis/: report.json, plots, README.md).

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml \\
        recipes/butterfly_text_classification.py recipes/configs/minilm_tweets.json
    python recipes/butterfly_text_classification.py --output_dir runs/x --max_steps 200 \\
        --spawn_steps 0 50 --num_children 3 --model_name_or_path bert-base-uncased --dataset imdb
    python recipes/butterfly_text_classification.py --output_dir runs/lora --peft lora --lora_r 8 \\
        --learning_rate 1e-3 --max_steps 200 --spawn_steps 0 50

Arguments: TextModelArguments, AdapterArguments (--peft lora|ia3), TextDataArguments,
StabilityArguments, RecipeAnalysisArguments and TrainingArguments, from one JSON/YAML file or from
flags (--help lists them all).
"""

from __future__ import annotations

from transformers import HfArgumentParser, TrainingArguments

from hf_stability import StabilityArguments
from hf_stability.studies.adapters import AdapterArguments
from hf_stability.studies.recipe import RecipeAnalysisArguments, parse_args, run_study, setup_logging
from hf_stability.studies.text_classification import (
    TextDataArguments,
    TextModelArguments,
    build_text_classification_trainer,
)

#: What this recipe parses, from a config file or flags (in this order).
ARGUMENTS = (TextModelArguments, AdapterArguments, TextDataArguments, StabilityArguments, RecipeAnalysisArguments,
             TrainingArguments)


def main(argv: list[str] | None = None) -> None:
    model_args, adapter, data_args, stability, analysis, training = parse_args(HfArgumentParser(ARGUMENTS), argv)
    setup_logging(training)
    run_study(build_text_classification_trainer(model_args, data_args, stability, training, adapter), analysis)


if __name__ == "__main__":
    main()
