"""Wall time of the phases of stacked children, and of the perturbation set-up of 8 children.

children_throughput.py's study (MiniLM-shaped BERT, 16 children x 60 steps, batch 32 x 128).
First the set-up of 8 perturbed children (copy, spawn weights, Gaussian noise at scale 0.01)
three ways: in 8 threads, one after the other, and in 8 threads with one intra-op thread each.
Then ``butterfly()`` of the children with K = 8 and K = 1 while ButterflyStudy's methods are timed
(each with a device synchronisation): ``train_run`` (the Trainer's train()), ``finalize`` (final
evaluation and the hand-over to the FinalWriter), the FinalWriter's last wait and, for K = 8, each
whole group; a group's set-up (perturbing and stacking) is its total less the others; and, per
train(), the host clock of its steps (``StepClock``). Prints.

    python benchmarks/stacked_phases.py [--fp32] [--stacked-only] [--cprofile]
"""

from __future__ import annotations

import copy
import cProfile
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from children_throughput import _data, _model, study_trainer
from transformers import TrainerCallback

from hf_stability.perturb import PerturbationConfig
from hf_stability.perturb.apply import perturb_model
from hf_stability.training import final_writer, stacked, study


def timed(fn) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def setup_times() -> dict[str, float]:
    template = _model().cuda()
    weights = {k: v.cpu().clone() for k, v in template.state_dict().items()}
    config = PerturbationConfig(scale=0.01)

    def child(k: int) -> torch.nn.Module:
        model = copy.deepcopy(template)
        model.load_state_dict(weights, strict=False)
        perturb_model(model, config, step=0, child=k)
        return model

    child(0)
    result = {"threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    result["setup_threads16"] = timed(lambda: list(ThreadPoolExecutor(8).map(child, range(1, 9))))
    result["setup_sequential"] = timed(lambda: [child(k) for k in range(1, 9)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    result["setup_threads_1intraop"] = timed(lambda: list(ThreadPoolExecutor(8).map(child, range(1, 9))))
    torch.set_num_threads(threads)
    result["one_child_deepcopy_load"] = timed(lambda: copy.deepcopy(template).load_state_dict(weights, strict=False))
    return result


def wrap(owner, name: str, key: str, phases: dict[str, float]) -> None:
    original = getattr(owner, name)

    def timed_call(*args, **kwargs):
        torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.synchronize()
            phases[key] = phases.get(key, 0.0) + time.perf_counter() - started

    setattr(owner, name, timed_call)


class StepClock(TrainerCallback):
    """Host clock of each train(): to its first step's end, the first three steps (the eager step,
    the warm-up and the capture of a stacked step's graphs), the steps after them, and from the
    last step's end until the device has finished it (a synchronisation in on_train_end)."""

    def __init__(self):
        self.runs: list[dict[str, float]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin, self.ends = time.perf_counter(), []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def on_train_end(self, args, state, control, **kwargs):
        if len(self.ends) < 4:
            return
        host_end = time.perf_counter()
        torch.cuda.synchronize()
        done, ends = time.perf_counter(), self.ends
        self.runs.append({"to first step": ends[0] - self.begin, "steps 2-3": ends[2] - ends[0],
                          f"steps 4-{len(ends)} per step ms": 1000 * (ends[-1] - ends[2]) / (len(ends) - 3),
                          "after last step, host": host_end - ends[-1], "device catching up": done - host_end})


def main() -> None:
    bf16 = "--fp32" not in sys.argv
    print(json.dumps(setup_times(), indent=1), flush=True)
    phases: dict[str, float] = {}
    wrap(study.ButterflyStudy, "train_run", "train_run", phases)
    wrap(study.ButterflyStudy, "finalize", "finalize (eval + hand-over)", phases)
    wrap(final_writer.FinalWriter, "wait", "writer wait", phases)
    wrap(study, "train_stacked_group", "group total", phases)
    wrap(stacked, "stacked_optimizer_state", "optimizer state", phases)
    train, test = _data(32 * 60, 128, 0), _data(256, 128, 1)
    for k in (8,) if "--stacked-only" in sys.argv else (8, 1):
        root = Path(tempfile.mkdtemp())
        trainer = study_trainer(root, train, test, k, bf16)
        trainer.butterfly()
        clock = StepClock()
        trainer.add_callback(clock)
        for child in root.glob("children/*"):
            shutil.rmtree(child)
        phases.clear()
        seconds = timed(trainer.butterfly)
        print(f"K={k} total {seconds:.2f} s", {key: round(value, 3) for key, value in phases.items()}, flush=True)
        for run in clock.runs:
            print("  train():", {key: round(value, 3) for key, value in run.items()}, flush=True)
        trainer.callback_handler.remove_callback(clock)
        if "--cprofile" in sys.argv:  # where the rest of the children's time goes (cProfile slows Python)
            for child in root.glob("children/*"):
                shutil.rmtree(child)
            profiler = cProfile.Profile()
            profiler.runcall(trainer.butterfly)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(70)
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
