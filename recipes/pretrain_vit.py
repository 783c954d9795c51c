#!/usr/bin/env python
"""Pretrain a small Vision Transformer on one task, so that a butterfly study can fine-tune a
pretrained model (no pretrained ViT is packaged for offline use). A plain Trainer run: the model
is saved with save_pretrained in --output_dir, ready for
``butterfly_image_classification.py --model_name_or_path OUTPUT_DIR``.

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml \\
        recipes/pretrain_vit.py recipes/configs/vit_fmnist_pretrain.json
    python recipes/pretrain_vit.py --model_type timm --classes 5 6 7 8 9 --output_dir runs/pretrained-timm \\
        --num_train_epochs 3

Arguments: ImageModelArguments, ImageDataArguments and TrainingArguments (--help lists them all).
Not a butterfly study: it ends with an evaluation (eval_results.json), not a report.
"""

from __future__ import annotations

import logging

from transformers import HfArgumentParser, Trainer, TrainingArguments, default_data_collator, set_seed

from hf_stability.metrics import classification_metrics
from hf_stability.studies.image_classification import (
    ImageDataArguments,
    ImageModelArguments,
    build_image_model,
    load_image_splits,
)
from hf_stability.studies.recipe import parse_args, setup_logging

logger = logging.getLogger(__name__)


#: What this recipe parses, from a config file or flags (in this order).
ARGUMENTS = (ImageModelArguments, ImageDataArguments, TrainingArguments)


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, training = parse_args(HfArgumentParser(ARGUMENTS), argv)
    setup_logging(training)
    splits = load_image_splits(data_args)
    set_seed(training.seed)
    model = build_image_model(model_args, num_labels=len(data_args.classes))
    model.config.label2id = {f"class_{c}": i for i, c in enumerate(data_args.classes)}
    model.config.id2label = {i: f"class_{c}" for i, c in enumerate(data_args.classes)}
    trainer = Trainer(model=model, args=training, train_dataset=splits["train"], eval_dataset=splits["eval"],
                      data_collator=default_data_collator, compute_metrics=classification_metrics("accuracy"))
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    trainer.save_metrics("eval", metrics)
    if trainer.is_world_process_zero():
        logger.info("Pretrained %s saved in %s (eval accuracy %.4f)", type(model).__name__, training.output_dir,
                    metrics.get("eval_accuracy", float("nan")))


if __name__ == "__main__":
    main()
