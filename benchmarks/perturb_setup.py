"""Time of perturbing one child: ``perturb_model`` with Gaussian noise at scale 0.01 (the
children_throughput study's perturbation) on a MiniLM-shaped BERT (6 layers, 384 hidden; 22.7M
parameters, random init), on the GPU if there is one, else on the CPU. Each repeat perturbs a
fresh copy of one model as another child (other draws); the figure is the median. The record of
one child is fingerprinted (its norms, as Python floats) so that two versions of the code can be
checked to perturb alike. Prints and writes JSON.

    python benchmarks/perturb_setup.py [--repeats 7] [--output FILE]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import platform
import statistics
import time

import torch
from children_throughput import _model
from report import emit

from hf_stability.perturb import PerturbationConfig
from hf_stability.perturb.apply import perturb_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    template = _model().to(device)
    config = PerturbationConfig(scale=0.01)
    perturb_model(copy.deepcopy(template), config, step=0, child=0)  # warm-up
    seconds, fingerprint = [], None
    for child in range(1, args.repeats + 1):
        model = copy.deepcopy(template)
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        record = perturb_model(model, config, step=0, child=child)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        if fingerprint is None:
            numbers = repr([(t.name, t.noise_l2, t.change_l2) for t in record.tensors] + [record.change_l2])
            fingerprint = hashlib.sha256(numbers.encode()).hexdigest()[:16]
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU {platform.machine()}, {os.cpu_count()} cores"
    result = {"device": name,
              "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
              "parameters": sum(p.numel() for p in template.parameters()),
              "seconds_per_child_median": statistics.median(seconds), "seconds": seconds,
              "record_fingerprint": fingerprint}
    print(f"perturb_model: {result['seconds_per_child_median']:.3f} s per child (median of {args.repeats}) "
          f"on {result['device']}, record {fingerprint}")
    emit(result, args.output)


if __name__ == "__main__":
    main()
