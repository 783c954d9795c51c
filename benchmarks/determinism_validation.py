"""Validation: with ``--deterministic true`` the control child ends bitwise equal to its parent
on one GPU; with the default kernels it does not.

Runs the text recipe (recipes/butterfly_text_classification.py, the pretrained MiniLM on the
tweets, fp32 with TF32 off) three times side by side, each in its own process: default kernels,
deterministic kernels, and deterministic kernels with the children stacked (parallel_children=2).
Each run has a control child and one perturbed child at two spawn steps. Then compares every
control's final weights with the parent's, tensor by tensor. Prints a table and writes JSON.

    python benchmarks/determinism_validation.py [--model PATH] [--max_steps 200] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from report import emit

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "default kernels": ["--deterministic", "false", "--parallel_children", "1"],
    "deterministic": ["--deterministic", "true", "--parallel_children", "1"],
    "deterministic, stacked children": ["--deterministic", "true", "--parallel_children", "2"],
}


def compare(parent_file: Path, child_file: Path) -> dict:
    from safetensors.torch import load_file

    parent, child = load_file(str(parent_file)), load_file(str(child_file))
    differing = [n for n in parent if not parent[n].equal(child[n])]
    squared = sum(float((parent[n].double() - child[n].double()).pow(2).sum()) for n in parent
                  if parent[n].is_floating_point())
    return {"bitwise_equal": not differing, "tensors_differing": len(differing), "tensors": len(parent),
            "l2": math.sqrt(squared)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", help="model_name_or_path of the text recipe")
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more recipe flags (CPU smoke runs)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    spawn = [0, args.max_steps // 2]
    root = Path(tempfile.mkdtemp(prefix="determinism-validation-"))
    common = ["--model_name_or_path", args.model, "--max_steps", str(args.max_steps), "--spawn_steps",
              *map(str, spawn), "--num_children", "1", "--per_device_train_batch_size", str(args.batch),
              "--learning_rate", "5e-5", "--warmup_steps", "20", "--max_eval_samples", "256", "--tf32", "false",
              "--analyze", "false", "--divergence_every", "50", "--save_strategy", "no", "--report_to", "none",
              "--logging_steps", "50", "--disable_tqdm", "true", "--seed", "0", *args.extra]
    processes = {}
    for name, flags in SETTINGS.items():
        out = root / name.replace(" ", "_").replace(",", "")
        command = [sys.executable, str(ROOT / "recipes" / "butterfly_text_classification.py"), "--output_dir",
                   str(out), *common, *flags]
        processes[name] = (out, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    rows = []
    for name, (out, process) in processes.items():
        log = process.communicate()[0]
        if process.returncode != 0:
            rows.append({"setting": name, "error": log[-3000:]})
            print(f"{name}: FAILED\n{log[-3000:]}")
            continue
        hardware = json.loads((out / "stability_config.json").read_text())["hardware"]
        for t in spawn:
            result = compare(out / "parent" / "final" / "model.safetensors",
                             out / "children" / f"t{t}" / "c0" / "final" / "model.safetensors")
            rows.append({"setting": name, "spawn_step": t, **result, "hardware": hardware})
            print(f"{name:>32}  t={t:<4} control == parent bitwise: {result['bitwise_equal']!s:5}  "
                  f"L2 {result['l2']:.3g}  ({result['tensors_differing']}/{result['tensors']} tensors differ)")
    import torch

    result = {"torch": torch.__version__, "max_steps": args.max_steps, "batch": args.batch,
              "model": Path(args.model).name, "runs": rows}
    emit(result, args.output)


if __name__ == "__main__":
    main()
