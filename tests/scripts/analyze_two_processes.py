"""Launched with 2 CPU processes by the analyzer test: analyze RUN with an accelerate Accelerator."""

import sys

from accelerate import Accelerator

from hf_stability.analysis import AnalyzeArguments, analyze_run

if __name__ == "__main__":
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.num_processes
    args = AnalyzeArguments(train_samples=48, batch_size=16, pairs="all", pooling="mean", cpu=True)
    analyze_run(sys.argv[1], args, accelerator)
    accelerator.end_training()
