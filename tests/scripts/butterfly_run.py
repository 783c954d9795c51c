"""A small butterfly study of a tiny BERT, run as its own process by the resume tests.

usage: butterfly_run.py OUT [KILL_DIR_SUFFIX KILL_STEP]
With a kill point, the process SIGKILLs itself when the run whose output_dir ends with
KILL_DIR_SUFFIX (e.g. "parent" or "children/t0/c1") finishes optimizer step KILL_STEP.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from helpers import tiny_bert, training_args, tweets
from transformers import TrainerCallback

from hf_stability import StabilityArguments, StabilityTrainer
from hf_stability.metrics import classification_metrics


class KillAt(TrainerCallback):
    def __init__(self, suffix, step):
        self.suffix, self.step = suffix, step

    def on_step_end(self, args, state, control, **kwargs):
        if args.output_dir.rstrip("/").endswith(self.suffix) and state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def build(out):
    train, test = tweets()
    return StabilityTrainer(
        model_init=lambda: tiny_bert(0),
        args=training_args(out, max_steps=12, save_strategy="steps", save_steps=4),
        train_dataset=train,
        eval_dataset=test,
        compute_metrics=classification_metrics(),
        stability_args=StabilityArguments(spawn_steps=[0, 5], num_children=2, divergence_every=4),
    )


if __name__ == "__main__":
    trainer = build(sys.argv[1])
    if len(sys.argv) > 2:
        trainer.add_callback(KillAt(sys.argv[2], int(sys.argv[3])))
    trainer.butterfly()
