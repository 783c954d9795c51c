"""Time of setting up one stacked group: 8 MiniLM-shaped children (22.7M parameters, random init)
given the spawn weights and perturbed with Gaussian noise at scale 0.01, on the GPU if there is one.

Two ways, each in 8 threads as a group is set up, and one after the other:
- ``copies``: each child a deep copy of the model, loaded with the spawn weights and perturbed,
  then stacked (how a group was set up before ``set_up_stack``);
- ``slices``: the spawn weights loaded once into every slice of the stack, each slice perturbed in
  place (``perturb_model(into=...)``, how ``training/stacked.py``'s ``set_up_stack`` does it).
Also the parts: the noise draws alone (the CPU generator), the host-to-device copy of one child's
noise, one child's ``perturb_model``. Medians of ``--repeats`` runs; prints and writes JSON.

    python benchmarks/group_set_up.py [--repeats 3] [--output FILE]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from children_throughput import _model
from report import emit

from hf_stability.perturb import PerturbationConfig
from hf_stability.perturb.apply import perturb_model
from hf_stability.training.checkpoints import load_checkpoint_weights
from hf_stability.training.stacked import StackedModel

CHILDREN = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def seconds(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(args.repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    template = _model().to(device)
    spawn = {k: v.cpu().clone() for k, v in template.state_dict().items()}
    config = PerturbationConfig(scale=0.01)
    sizes = [p.numel() for p in template.parameters()]
    generators = [torch.Generator().manual_seed(k) for k in range(CHILDREN)]
    noise = torch.randn(sum(sizes))
    stack = StackedModel([template] * CHILDREN)

    def copy_child(k: int) -> torch.nn.Module:
        model = copy.deepcopy(template)
        load_checkpoint_weights(model, spawn)
        perturb_model(model, config, step=0, child=k + 1)
        return model

    def perturb_slice(k: int) -> None:
        perturb_model(template, config, step=0, child=k + 1, into=stack.child_parameters(k))

    def by_copies(workers: int) -> None:
        with ThreadPoolExecutor(workers) as pool:
            stack.load(list(pool.map(copy_child, range(CHILDREN))))

    def by_slices(workers: int) -> None:
        load_checkpoint_weights(template, spawn)
        stack.load([template] * CHILDREN)
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(perturb_slice, range(CHILDREN)))

    by_copies(CHILDREN), by_slices(CHILDREN)  # warm-up
    with ThreadPoolExecutor(CHILDREN) as pool:
        draws_in_threads = seconds(lambda: list(pool.map(lambda g: [torch.randn(n, generator=g) for n in sizes],
                                                         generators)))
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores",
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "children": CHILDREN,
        "parameters_per_child": sum(sizes), "repeats": args.repeats,
        "group_by_copies_threads_s": seconds(lambda: by_copies(CHILDREN)),
        "group_by_slices_threads_s": seconds(lambda: by_slices(CHILDREN)),
        "group_by_copies_one_after_the_other_s": seconds(lambda: by_copies(1)),
        "group_by_slices_one_after_the_other_s": seconds(lambda: by_slices(1)),
        "one_child_perturb_model_s": seconds(lambda: perturb_model(template, config, step=0, child=1,
                                                                   into=stack.child_parameters(0))),
        "one_child_noise_draws_s": seconds(lambda: [torch.randn(n, generator=generators[0]) for n in sizes]),
        "group_noise_draws_in_threads_s": draws_in_threads,
        "one_child_noise_to_device_s": seconds(lambda: noise.to(device)),
    }
    print(f"one group of {CHILDREN} on {result['device']}: {result['group_by_slices_threads_s']:.3f} s in the "
          f"stack's slices, {result['group_by_copies_threads_s']:.3f} s as copies of the model (threads)")
    emit(result, args.output)


if __name__ == "__main__":
    main()
