#!/usr/bin/env python
"""Butterfly study of a causal language model: fine-tune a decoder (default config: the small Llama
recipes/pretrain_causal_lm.py pretrains) on labelled text cast as instruction-style completions
("Text: ...\nSentiment:" -> " positive", the prompt labelled -100), with a LoRA adapter or fully;
spawn perturbed children and a control at the spawn steps, then analyze the run directory
(token-level loss, perplexity and next-token error along the path, CKA, alignment) and render its
report (RUN/analysis/: report.json, plots, README.md).

    python recipes/pretrain_causal_lm.py recipes/configs/llama_pretrain_text.json
    accelerate launch --config_file recipes/accelerate/single_gpu.yaml \\
        recipes/butterfly_causal_lm.py recipes/configs/llama_tweets_lora.json
    python recipes/butterfly_causal_lm.py --model_name_or_path runs/llama-small --output_dir runs/full \\
        --learning_rate 1e-4 --max_steps 300 --spawn_steps 0 30 100 --num_children 3

Arguments: CausalModelArguments, AdapterArguments (--peft lora), CompletionDataArguments,
StabilityArguments, RecipeAnalysisArguments and TrainingArguments, from one JSON/YAML file or from
flags (--help lists them all).
"""

from __future__ import annotations

from transformers import HfArgumentParser, TrainingArguments

from hf_stability import StabilityArguments
from hf_stability.studies.adapters import AdapterArguments
from hf_stability.studies.causal_lm import CausalModelArguments, CompletionDataArguments, build_causal_lm_trainer
from hf_stability.studies.recipe import RecipeAnalysisArguments, parse_args, run_study, setup_logging

#: What this recipe parses, from a config file or flags (in this order).
ARGUMENTS = (CausalModelArguments, AdapterArguments, CompletionDataArguments, StabilityArguments,
             RecipeAnalysisArguments, TrainingArguments)


def main(argv: list[str] | None = None) -> None:
    model_args, adapter, data_args, stability, analysis, training = parse_args(HfArgumentParser(ARGUMENTS), argv)
    setup_logging(training)
    run_study(build_causal_lm_trainer(model_args, data_args, stability, training, adapter), analysis)


if __name__ == "__main__":
    main()
