#!/usr/bin/env python
"""Pretrain a small Llama-shaped decoder on the packaged text (tweets and drug reviews), so that a
causal language model study can fine-tune a pretrained model offline (no pretrained decoder is
packaged). A plain Trainer run: the model and its tokenizer are saved with save_pretrained in
--output_dir, ready for ``butterfly_causal_lm.py --model_name_or_path OUTPUT_DIR``.

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml \\
        recipes/pretrain_causal_lm.py recipes/configs/llama_pretrain_text.json
    python recipes/pretrain_causal_lm.py --output_dir runs/llama-small --hidden_size 256 \\
        --num_hidden_layers 4 --num_train_epochs 1

Arguments: DecoderArguments, CorpusArguments and TrainingArguments (--help lists them all).
Not a butterfly study: it ends with an evaluation (eval_results.json, with the perplexity), not a
report.
"""

from __future__ import annotations

import logging
import math

from transformers import HfArgumentParser, TrainingArguments

from hf_stability.studies.decoder_pretraining import CorpusArguments, DecoderArguments, build_pretraining_trainer
from hf_stability.studies.recipe import parse_args, setup_logging

logger = logging.getLogger(__name__)

#: What this recipe parses, from a config file or flags (in this order).
ARGUMENTS = (DecoderArguments, CorpusArguments, TrainingArguments)


def main(argv: list[str] | None = None) -> None:
    model_args, corpus, training = parse_args(HfArgumentParser(ARGUMENTS), argv)
    setup_logging(training)
    trainer = build_pretraining_trainer(model_args, corpus, training)
    trainer.train()
    metrics = trainer.evaluate()
    metrics["eval_perplexity"] = math.exp(metrics["eval_loss"]) if metrics["eval_loss"] < 700 else math.inf
    trainer.save_model()
    trainer.save_metrics("eval", metrics)
    if trainer.is_world_process_zero():
        parameters = sum(p.numel() for p in trainer.model.parameters())
        logger.info("Pretrained a %.1fM-parameter %s, saved in %s (eval loss %.4f, perplexity %.1f)",
                    parameters / 1e6, type(trainer.model).__name__, training.output_dir, metrics["eval_loss"],
                    metrics["eval_perplexity"])


if __name__ == "__main__":
    main()
