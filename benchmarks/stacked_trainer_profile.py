"""Where a stacked group's ``train()`` goes, inside the real Trainer loop.

children_throughput.py's study (MiniLM-shaped BERT, 60 steps, batch 32 x 128 tokens): the parent
is trained, then the children of spawn step 0 are trained again with K children at a time while
a cProfile of ``ButterflyStudy.train_run`` (main thread) runs, a callback records each step's
wall time, and a torch.profiler table covers steps 21-25 of the first group. cProfile slows
Python-heavy code, so the step times it reports are upper bounds; the torch.profiler table's
device time is not affected. Writes the three into one text file.

    python benchmarks/stacked_trainer_profile.py OUTPUT_DIR K [--fp32]
"""

from __future__ import annotations

import cProfile
import io
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from children_throughput import _data, study_trainer
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

from hf_stability.training import study as study_module


class StepTimes(TrainerCallback):
    """Wall time at each step's end; a torch.profiler over steps 21-25 of the first run."""

    def __init__(self):
        self.events: list[tuple[str, int, float]] = []
        self.profiler = None
        self.profiled = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.events.append(("begin", state.global_step, time.perf_counter()))

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 20 and self.profiler is None:
            self.profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append(("step", state.global_step, time.perf_counter()))
        if state.global_step == 25 and self.profiler is not None and not self.profiled:
            torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)
            self.profiled = True


def main() -> None:
    out, k, bf16 = Path(sys.argv[1]), int(sys.argv[2]), "--fp32" not in sys.argv
    steps = StepTimes()
    train, test = _data(32 * 60, 128, 0), _data(256, 128, 1)
    root = Path(tempfile.mkdtemp())
    trainer = study_trainer(root, train, test, k, bf16, children=16 if k > 1 else 4)
    trainer.butterfly()
    for child in root.glob("children/*"):
        shutil.rmtree(child)
    original, profiler, runs = study_module.ButterflyStudy.train_run, cProfile.Profile(), []

    def train_run(self, resume, callbacks):
        self.trainer.add_callback(steps)
        started = time.perf_counter()
        profiler.enable()
        try:
            return original(self, resume, callbacks)
        finally:
            profiler.disable()
            torch.cuda.synchronize()
            runs.append(time.perf_counter() - started)
            self.trainer.remove_callback(steps)

    study_module.ButterflyStudy.train_run = train_run
    started = time.perf_counter()
    trainer.butterfly()
    total = time.perf_counter() - started
    shutil.rmtree(root, ignore_errors=True)
    gaps, last = [], None
    for kind, _, at in steps.events:
        if kind == "step" and last is not None:
            gaps.append(at - last)
        last = at if kind == "step" else None
    gaps.sort()
    lines = [f"K={k} {'bf16' if bf16 else 'fp32'} on {torch.cuda.get_device_name()}: butterfly() of the children "
             f"{total:.2f} s; train_run calls {[round(r, 2) for r in runs]} s",
             f"step wall time under cProfile: median {gaps[len(gaps) // 2] * 1e3:.1f} ms over {len(gaps)} steps"]
    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer)
    stats.sort_stats("cumulative").print_stats(70)
    stats.sort_stats("tottime").print_stats(30)
    table = steps.profiler.key_averages().table(sort_by="self_cuda_time_total", row_limit=25) if steps.profiler else ""
    text = "\n".join(lines) + "\n\n" + table + "\n\n" + buffer.getvalue()
    (out / f"stacked_trainer_profile_k{k}{'' if bf16 else '_fp32'}.txt").write_text(text)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
