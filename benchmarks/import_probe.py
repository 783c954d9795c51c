"""What a process spends before an analysis can load its first model: the seconds since the
process started after each import or initialisation the ``analyze`` command goes through.

Run as ``T0=$(date +%s.%N) python benchmarks/import_probe.py``: "launch" lines are wall-clock
seconds since T0 (the shell's clock), the others ``process_age()`` (Linux /proc). The first line
imports torch (hf_stability.analysis.timing does). Prints.
"""

import os
import time

T0 = float(os.environ.get("T0", "nan"))
print(f"launch -> first line {time.time() - T0:.3f} s")

from hf_stability.analysis.timing import process_age  # noqa: E402

marks = [("interpreter + site", process_age())]  # (the import above imports torch)


def mark(name: str) -> None:
    marks.append((name, process_age()))


import torch  # noqa: E402

mark("import torch")
torch.cuda.init()
mark("torch.cuda.init()")
from transformers import HfArgumentParser  # noqa: E402,F401

mark("import transformers + HfArgumentParser")
import hf_stability.analysis.runner  # noqa: E402,F401

mark("import hf_stability.analysis")
from accelerate import Accelerator  # noqa: E402

mark("import accelerate")
accelerator = Accelerator()
mark("Accelerator()")
torch.zeros(1, device="cuda")
mark("first CUDA tensor")
from transformers import BertForSequenceClassification  # noqa: E402,F401

mark("import BertForSequenceClassification")
import datasets  # noqa: E402,F401

mark("import datasets")
for name, seconds in marks:
    print(f"{name:45s} {seconds:7.3f}")
print(f"launch -> end {time.time() - T0:.3f} s")
