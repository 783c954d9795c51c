"""Launched with 2 CPU processes by the heads test: the loss, error, disagreement and loss barrier
of every head of tests/test_heads.py, written by the main process to the JSON file argv[1]."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from accelerate import Accelerator
from test_heads import HEADS, measured

if __name__ == "__main__":
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.num_processes
    figures = {name: measured(name, accelerator) for name in HEADS}
    if accelerator.is_main_process:
        with open(sys.argv[1], "w") as f:
            json.dump(figures, f)
    accelerator.end_training()
