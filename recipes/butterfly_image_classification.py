#!/usr/bin/env python
"""Butterfly study of a Vision Transformer image classifier, in the style of transformers'
run_image_classification.py: a transformers ViT (--model_type vit) or a timm ViT (--model_type
timm, through transformers' TimmWrapper), from random initialisation or fine-tuned from a
pretrained folder (--model_name_or_path, e.g. made by recipes/pretrain_vit.py), on Fashion-MNIST
(offline) or a dataset with image and label columns. Ends with analysis and report.

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml \\
        recipes/butterfly_image_classification.py recipes/configs/vit_fmnist_finetune.json
    python recipes/butterfly_image_classification.py --model_type timm --output_dir runs/timm \\
        --max_steps 300 --spawn_steps 0 30 100 --classes 0 1 2 3 4

Arguments: ImageModelArguments, ImageDataArguments, StabilityArguments, RecipeAnalysisArguments
and TrainingArguments, from one JSON/YAML file or from flags (--help lists them all).
"""

from __future__ import annotations

from transformers import HfArgumentParser, TrainingArguments

from hf_stability import StabilityArguments
from hf_stability.studies.image_classification import (
    ImageDataArguments,
    ImageModelArguments,
    build_image_classification_trainer,
)
from hf_stability.studies.recipe import RecipeAnalysisArguments, parse_args, run_study, setup_logging

#: What this recipe parses, from a config file or flags (in this order).
ARGUMENTS = (ImageModelArguments, ImageDataArguments, StabilityArguments, RecipeAnalysisArguments, TrainingArguments)


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, stability, analysis, training = parse_args(HfArgumentParser(ARGUMENTS), argv)
    setup_logging(training)
    run_study(build_image_classification_trainer(model_args, data_args, stability, training), analysis)


if __name__ == "__main__":
    main()
