"""Step-time overhead of StabilityTrainer's parent run (spawn checkpoints + divergence snapshots)
against a plain transformers.Trainer on the same run, in the same process.

Runs alternate (plain, parent, plain, parent, ...) so drift of the machine hits both alike.
A step's time is the wall time between two consecutive on_step_end events, so it includes
whatever the callbacks do. Batches are padded to a fixed length so that step i costs the same
in both runs; the headline figure is the median over steps of the ratio parent/plain of the
same step i (pooled over repeats), next to the ratio of the two medians. Prints the figures and
writes benchmarks/results/callback_overhead.json.

    python benchmarks/callback_overhead.py [--repeats 4] [--max_steps 40]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from report import emit
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

from hf_stability import StabilityArguments
from hf_stability.studies.text_classification import (
    TextDataArguments,
    TextModelArguments,
    build_text_classification_trainer,
)


class StepTimer(TrainerCallback):
    """Wall time between consecutive optimizer steps of the runs whose output_dir ends with ``suffix``."""

    def __init__(self, suffix: str = ""):
        self.suffix, self.times, self._last = suffix, [], None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter() if args.output_dir.endswith(self.suffix) else None

    def on_step_end(self, args, state, control, **kwargs):
        if self._last is not None:
            now = time.perf_counter()
            self.times.append(now - self._last)
            self._last = now


def _arguments(output_dir: str, max_steps: int, every: int):
    data = TextDataArguments(max_train_samples=2048, max_eval_samples=64, max_length=48)
    # the parent saves spawn checkpoints at 0 and at the last step but one; one 1-step control child
    stability = StabilityArguments(spawn_steps=[0, max_steps - 1], num_children=0, divergence_every=every)
    training = TrainingArguments(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=16, learning_rate=1e-4,
        seed=0, save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=every,
    )
    return TextModelArguments(), data, stability, training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--divergence_every", type=int, default=10)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "callback_overhead.json"))
    cli = parser.parse_args()

    plain_times, parent_times, paired = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(-1, cli.repeats):  # repeat -1 warms the machine up and is not counted
            # plain Trainer: the same model, data and arguments, no stability machinery
            arguments = _arguments(f"{tmp}/plain{repeat}", cli.max_steps, cli.divergence_every)
            training = arguments[-1]
            built = build_text_classification_trainer(*arguments)
            collator = DataCollatorWithPadding(built.processing_class, padding="max_length", max_length=48)
            plain_timer = StepTimer()
            plain = Trainer(
                model_init=built.model_init, args=training, train_dataset=built.train_dataset,
                data_collator=collator, callbacks=[plain_timer],
            )
            plain.train()

            # StabilityTrainer parent: spawn checkpoints and divergence snapshots
            study = build_text_classification_trainer(*_arguments(f"{tmp}/study{repeat}", cli.max_steps,
                                                                  cli.divergence_every))
            study.data_collator = collator
            timer = StepTimer(suffix="parent")  # only the parent's steps are timed
            study.add_callback(timer)
            study.butterfly()
            if repeat < 0:
                continue
            plain_times += plain_timer.times[1:]  # the first step includes start-up
            parent_times += timer.times[1:]
            paired += [b / a for a, b in zip(plain_timer.times[1:], timer.times[1:])]
            print(f"repeat {repeat}: plain median {statistics.median(plain_times):.4f}s, "
                  f"parent median {statistics.median(parent_times):.4f}s")

    result = {
        "benchmark": "callback_overhead",
        "model": "all-MiniLM-L6-v2 (packaged), batch 16, max_length 48",
        "max_steps": cli.max_steps,
        "divergence_every": cli.divergence_every,
        "repeats": cli.repeats,
        "plain_median_step_s": statistics.median(plain_times),
        "parent_median_step_s": statistics.median(parent_times),
        "median_paired_step_ratio": statistics.median(paired),
        "ratio_of_medians": statistics.median(parent_times) / statistics.median(plain_times),
        "mean_ratio": statistics.mean(parent_times) / statistics.mean(plain_times),
        "target_median_ratio": 1.02,
        "steps_timed_per_run": cli.max_steps - 1,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads()},
        "torch": torch.__version__,
    }
    emit(result, cli.output)


if __name__ == "__main__":
    main()
