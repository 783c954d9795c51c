"""Peak memory of `analyze_run` against the number of children of a spawn step.

The analyzer holds at most the parent, one child (two for child-child pairs) and the
interpolation buffer in memory, whatever the number of children: the peak resident memory of
an analysis of 2 and of 8 children should differ by less than one model. Each study is a BERT
of about 30M parameters (120 MB in fp32) trained for a few steps on random tokens; each
analysis runs in a fresh process whose peak RSS (ru_maxrss) is read when it ends.

    python benchmarks/analysis_memory.py [--children 2 8] [--output FILE]
"""

from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from report import emit
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from hf_stability import StabilityArguments, StabilityTrainer

ANALYSE = """
import resource, sys
from hf_stability.analysis import AnalyzeArguments, analyze_run
analyze_run(sys.argv[1], AnalyzeArguments(eval_samples=64, train_samples=32, batch_size=32, alphas=3, cpu=True))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                                    intermediate_size=1024, num_labels=3))


def _study(out: Path, children: int) -> int:
    generator = torch.Generator().manual_seed(0)
    rows = {"input_ids": torch.randint(1000, 30000, (128, 32), generator=generator).tolist(),
            "attention_mask": [[1] * 32] * 128, "labels": torch.randint(0, 3, (128,), generator=generator).tolist()}
    data = Dataset.from_dict(rows)
    trainer = StabilityTrainer(
        model_init=_model, train_dataset=data, eval_dataset=data,
        args=TrainingArguments(str(out), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-4,
                               report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True),
        stability_args=StabilityArguments(spawn_steps=[1], num_children=children, control_child=False,
                                          divergence_every=0, analysis_train_samples=32),
    )
    trainer.butterfly()
    return sum(p.numel() * p.element_size() for p in trainer.model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--children", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.children:
            out = Path(tmp) / f"k{k}"
            model_bytes = _study(out, k)
            done = subprocess.run([sys.executable, "-c", ANALYSE, str(out)], capture_output=True, text=True,
                                  check=True)
            peak_kib = int(done.stdout.strip().splitlines()[-1])
            rows.append({"children": k, "peak_rss_mib": round(peak_kib / 1024, 1),
                         "model_mib": round(model_bytes / 2**20, 1)})
            print(f"{k} children: peak RSS {peak_kib / 1024:.0f} MiB (one model: {model_bytes / 2**20:.0f} MiB)",
                  file=sys.stderr)
    growth = rows[-1]["peak_rss_mib"] - rows[0]["peak_rss_mib"]
    emit({
        "benchmark": "analysis_memory",
        "machine": f"{platform.machine()}, {resource.getpagesize()} B pages, torch {torch.__version__}, CPU",
        "rows": rows,
        "growth_mib": round(growth, 1),
        "growth_in_models": round(growth / rows[0]["model_mib"], 2),
        "target": "growth below one model",
    }, args.output)


if __name__ == "__main__":
    main()
