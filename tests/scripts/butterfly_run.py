"""A small butterfly study of a tiny BERT, analysed and reported, run as its own process by the
kill-and-resume tests.

usage: butterfly_run.py OUT [--constant] [--lora] [WHERE STEP]
--constant: a constant learning rate (no warm-up, no decay) and children 0 and 1 of each spawn step
trained as one stacked group (parallel_children=2), child 2 alone: a step taken after the last one
would change the weights (with a schedule that ends at 0 it would not).
--lora: the tiny BERT with a LoRA adapter (peft): every checkpoint and final/ holds the adapter.
With a kill point, the process SIGKILLs itself:
- WHERE a run's output_dir suffix ("parent", "children/t0/c1", "children/t0/.stacked-0-1.tmp"), STEP an
  optimizer step: when that run finishes the step; STEP "begin": when that run starts (the previous
  child is complete); STEP "evaluate<n>": at that run's n-th evaluation, which for the parent and a
  child alone is the final one, after its last checkpoint and before its final/ (for a stacked
  group, evaluation n finalises its n-th child);
- WHERE "analysis", STEP n: when the analysis collates its n-th batch;
- WHERE "report", STEP "plots": after the report's plots are written, before its card.
With WHERE "pause", STEP n: when the parent finishes step n, print "paused" and wait for a line on
stdin (a process holding the run directory, for the tests of a second writer).
With WHERE "disk", STEP n: no file of the process may grow beyond n bytes (a full disk,
simulated with RLIMIT_FSIZE); an HfStabilityError is printed and the process exits with 1.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from helpers import peft_bert, tiny_bert, training_args, tweets
from transformers import TrainerCallback

from hf_stability import StabilityArguments, StabilityTrainer
from hf_stability.analysis import AnalyzeArguments, analyze_run
from hf_stability.analysis.loading import run_collator
from hf_stability.metrics import classification_metrics
from hf_stability.report import load_report, render_plots, write_report
from hf_stability.run_directory import RunDirectory

ANALYSIS = AnalyzeArguments(train_samples=16, batch_size=16, alphas=3, cpu=True)


def die():
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(TrainerCallback):
    def __init__(self, suffix, step):
        self.suffix, self.step = suffix, step
        self.evaluations = 0

    def _here(self, args):
        return args.output_dir.rstrip("/").endswith(self.suffix)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.step == "begin" and self._here(args):
            die()

    def on_evaluate(self, args, state, control, **kwargs):
        if self._here(args):
            self.evaluations += 1
            if self.step == f"evaluate{self.evaluations}" or (self.step == "evaluate" and self.evaluations == 1):
                die()

    def on_step_end(self, args, state, control, **kwargs):
        if self._here(args) and str(state.global_step) == self.step:
            die()


class PauseAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if args.output_dir.rstrip("/").endswith("parent") and str(state.global_step) == self.step:
            print("paused", flush=True)
            sys.stdin.readline()


def build(out, constant=False, lora=False):
    train, test = tweets()
    schedule = dict(lr_scheduler_type="constant", warmup_steps=0) if constant else {}
    return StabilityTrainer(
        model_init=(lambda: peft_bert("lora")) if lora else lambda: tiny_bert(0),
        args=training_args(out, max_steps=12, save_strategy="steps", save_steps=4, **schedule),
        train_dataset=train,
        eval_dataset=test,
        compute_metrics=classification_metrics(),
        stability_args=StabilityArguments(spawn_steps=[0, 5], num_children=2, divergence_every=4,
                                          parallel_children=2 if constant else 1),
    )


def killing_collator(run_dir, at_batch):
    """The run's own collator, dying at its ``at_batch``-th batch (a kill in the middle of the analysis)."""
    collate, seen = run_collator(RunDirectory(run_dir)), [0]

    def collate_or_die(features):
        seen[0] += 1
        if seen[0] == at_batch:
            die()
        return collate(features)

    return collate_or_die


if __name__ == "__main__":
    args = sys.argv[1:]
    constant, lora = "--constant" in args, "--lora" in args
    args = [a for a in args if a not in ("--constant", "--lora")]
    out, where, step = args[0], *(args[1:3] if len(args) > 2 else (None, None))
    trainer = build(out, constant, lora)
    if where == "disk":
        import resource

        from hf_stability.errors import HfStabilityError

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(step), int(step)))
        try:
            trainer.butterfly()
        except HfStabilityError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        sys.exit(0)
    if where == "pause":
        trainer.add_callback(PauseAt(step))
    elif where not in (None, "analysis", "report"):
        trainer.add_callback(KillAt(where, step))
    trainer.butterfly()
    collate = killing_collator(out, int(step)) if where == "analysis" else None
    analyze_run(out, ANALYSIS, collate_fn=collate)
    if where == "report":
        render_plots(load_report(out), RunDirectory(out).analysis_dir / "plots")
        die()
    write_report(out)
