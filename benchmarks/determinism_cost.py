"""Step-time cost of deterministic kernels (StabilityArguments.deterministic).

Times full training steps (forward, backward, gradient clipping, AdamW) of a MiniLM classifier
on synthetic tokens, with and without ``hf_stability.training.determinism.deterministic_algorithms``, in
fp32 (TF32 off) and under bf16 autocast. cuBLAS reads its workspace setting once per process,
so every setting runs in its own worker process. Prints a table and writes JSON.

    python benchmarks/determinism_cost.py [--model PATH] [--steps 100] [--batch 64] [--seq-len 64]
        [--output FILE]

--model: a BERT folder (default: the packaged MiniLM; its weights are not needed for timing,
only its shape).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from report import emit

SETTINGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def worker(model_path: str, precision: str, deterministic: bool, steps: int, batch: int, seq_len: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from hf_stability.training.determinism import deterministic_algorithms

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with deterministic_algorithms(deterministic):
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(model_path, num_labels=3)
        model = AutoModelForSequenceClassification.from_config(config).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
        ids = torch.randint(1000, 30000, (batch, seq_len), device=device)
        labels = torch.randint(0, 3, (batch,), device=device)
        dtype = torch.bfloat16 if precision == "bf16" else None

        def step() -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        for _ in range(10):
            step()
        times = []
        for _ in range(steps):
            sync()
            started = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - started)
    return {"precision": precision, "deterministic": deterministic, "median_step_ms": 1000 * statistics.median(times),
            "mean_step_ms": 1000 * statistics.fmean(times), "steps": steps,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--output", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from hf_stability.data.models import minilm_path

        args.model = str(minilm_path())
    if args.worker:
        precision, deterministic = args.worker.split(":")
        result = worker(args.model, precision, deterministic == "1", args.steps, args.batch, args.seq_len)
        print("RESULT " + json.dumps(result))
        return
    rows = []
    for precision, deterministic in SETTINGS:
        command = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--batch",
                   str(args.batch), "--seq-len", str(args.seq_len), "--worker", f"{precision}:{int(deterministic)}"]
        env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
        out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
        rows.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
        r = rows[-1]
        print(f"{precision:>4} deterministic={deterministic!s:5}: {r['median_step_ms']:7.2f} ms/step (median)")
    for row in rows:
        base = next(r for r in rows if r["precision"] == row["precision"] and not r["deterministic"])
        row["vs_default"] = row["median_step_ms"] / base["median_step_ms"]
    import torch
    import transformers

    result = {"device": rows[0]["device"], "torch": torch.__version__, "transformers": transformers.__version__,
              "model": Path(args.model).name, "batch": args.batch, "seq_len": args.seq_len, "runs": rows}
    emit(result, args.output)


if __name__ == "__main__":
    main()
