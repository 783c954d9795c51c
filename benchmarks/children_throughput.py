"""Children throughput: 16 children of one spawn step (15 perturbed + the control) of a
MiniLM-shaped BERT (6 layers, 384 hidden, 12 heads; random init, synthetic tokens), trained
one after the other (parallel_children=1) and K at a time as one stacked model (K = 4, 8, 16).

The parent is trained once for K = 1 and once for the stacked settings (a run created with
parallel_children > 1 trains every model with stacked children's dropout: docs/parallel_children.md);
each setting then trains only the children. Reports wall time, child-steps per second, the ratio to
sequential, peak GPU memory and how far the control child ends from its parent (relative L2).
--profile times a bare training step (forward, backward, fused AdamW, under the run's precision) of
one model and of 8 stacked children with and without CUDA graphs, and writes a torch.profiler
table of one step of 8 stacked children beside the JSON. Prints and writes JSON.

    python benchmarks/children_throughput.py [--steps 60] [--batch 32] [--seq-len 128] [--bf16 | --tf32]
        [--ks 1,4,8,16] [--repeats 1] [--profile] [--output FILE]

--repeats N measures every K N times in turn (K=1, K=8, K=1, K=8, ...) in one process, so that each
ratio to sequential compares runs made minutes apart on one host.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from datasets import Dataset
from profile_table import device_name, write_profile
from report import emit
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from hf_stability import StabilityArguments, StabilityTrainer
from hf_stability.errors import HfStabilityError


def _data(n: int, seq_len: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (n, seq_len), generator=g)
    ids[:, 0] = 101
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": torch.randint(0, 3, (n,), generator=g).tolist()})


def _model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                                    intermediate_size=1536, num_labels=3))


def _relative_l2(a: Path, b: Path) -> float:
    """||a - b|| / ||a|| over every tensor of two final/ folders (the control against its parent)."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    num = sum(float((wa[n].double() - wb[n].double()).pow(2).sum()) for n in wa)
    return (num / sum(float(w.double().pow(2).sum()) for w in wa.values())) ** 0.5


def study_trainer(root: Path, train: Dataset, test: Dataset, parallel_children: int, bf16: bool, tf32: bool = False,
                  steps: int = 60, batch: int = 32, children: int = 16) -> StabilityTrainer:
    """This benchmark's study on ``root``: ``children`` children of spawn step 0 (the control
    included), divergence every 20 steps, each child evaluated on ``test``."""
    return StabilityTrainer(
        model_init=_model,
        args=TrainingArguments(str(root), max_steps=steps, per_device_train_batch_size=batch,
                               per_device_eval_batch_size=128, learning_rate=1e-4, warmup_steps=5,
                               bf16=bf16, tf32=tf32 or None, save_strategy="no", report_to="none",
                               logging_steps=20, disable_tqdm=True, seed=0),
        train_dataset=train, eval_dataset=test,
        stability_args=StabilityArguments(spawn_steps=[0], num_children=children - 1,
                                          parallel_children=parallel_children, perturbation_scale=0.01,
                                          divergence_every=20, keep_parent_trajectory=True),
    )


def _bare_step(model: torch.nn.Module, args: argparse.Namespace, device: str) -> Callable[[], None]:
    """One training step of ``model`` on a fixed batch: forward, backward, fused AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (args.batch, args.seq_len), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.randint(0, 3, (args.batch,), generator=g).to(device)}

    def step() -> None:
        with torch.autocast(device, torch.bfloat16, enabled=args.bf16):
            loss = model(**batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bare_step_ms(args: argparse.Namespace, steps: int = 30) -> dict[str, float]:
    """Wall milliseconds of a bare step (after 5 warm-up steps): one model, and 8 stacked
    children with CUDA graphs and without."""
    from hf_stability.training.stacked import StackedModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = {"one_model": lambda: _model().to(device).train(),
              "stacked_8_cuda_graphs": lambda: StackedModel([_model() for _ in range(8)]).to(device).train(),
              "stacked_8_eager": lambda: StackedModel([_model() for _ in range(8)], cuda_graphs=False)
              .to(device).train()}
    from forward_precision import _seconds_per_call

    return {name: _seconds_per_call(_bare_step(build(), args, device), warmups=5, repeats=steps) * 1e3
            for name, build in models.items()}


def profile_stacked_step(k: int, args: argparse.Namespace, path: Path) -> None:
    """A torch.profiler table of one training step of ``k`` stacked children (after two warm-up
    steps, the second of which captures it as CUDA graphs on a GPU)."""
    from hf_stability.training.stacked import StackedModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    step = _bare_step(StackedModel([_model() for _ in range(k)]).to(device).train(), args, device)
    step(), step()
    precision = "bf16 autocast" if args.bf16 else "tf32" if args.tf32 else "fp32"
    write_profile(step, path, f"One training step of {k} stacked MiniLM-shaped children (batch {args.batch} x "
                  f"{args.seq_len} tokens, {precision}) on {device_name()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ks", default="1,4,8,16")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--repeats", type=int, default=1, help="measure every K this many times, in turn")
    parser.add_argument("--tf32", action="store_true", help="TF32 matmuls (TrainingArguments.tf32)")
    parser.add_argument("--profile", action="store_true", help="write a profile of one stacked step (needs --output)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    train, test = _data(args.batch * args.steps, args.seq_len, 0), _data(256, args.seq_len, 1)
    roots = {stacked: Path(tempfile.mkdtemp(prefix="children-throughput-")) for stacked in (False, True)}
    children, rows = 16, []
    ks = [int(x) for x in args.ks.split(",")]
    try:
        for repeat, k in ((r, k) for r in range(args.repeats) for k in ks):
            root = roots[k > 1]
            for child_dir in root.glob("children/*"):
                shutil.rmtree(child_dir)
            trainer = study_trainer(root, train, test, k, args.bf16, args.tf32, args.steps, args.batch, children)
            if not (root / "parent" / "final").is_dir():
                trainer.butterfly()  # the parent (and a first set of children, discarded)
                for child_dir in root.glob("children/*"):
                    shutil.rmtree(child_dir)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            try:
                trainer.butterfly()
            except HfStabilityError as err:  # a K refused before training (memory estimate)
                rows.append({"parallel_children": k, "repeat": repeat, "refused": str(err)})
                print(f"K={k:>2}: refused: {err}")
                continue
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            rows.append({"parallel_children": k, "repeat": repeat, "seconds": seconds,
                         "child_steps_per_s": children * args.steps / seconds,
                         "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
                         "control_vs_parent_l2": _relative_l2(root / "parent" / "final",
                                                              root / "children" / "t0" / "c0" / "final")})
            print(f"K={k:>2}: {seconds:7.1f} s for {children} children x {args.steps} steps, "
                  f"{rows[-1]['child_steps_per_s']:7.1f} child-steps/s, peak {rows[-1]['peak_gpu_gib']:.2f} GiB, "
                  f"control vs parent {rows[-1]['control_vs_parent_l2']:.2e}")
    finally:
        for root in roots.values():
            shutil.rmtree(root, ignore_errors=True)
    for row in rows:  # against the sequential run of the same repeat
        sequential = next((r["seconds"] for r in rows if r["parallel_children"] == 1 and r["repeat"] == row["repeat"]
                           and "seconds" in r), None)
        if "seconds" in row:
            row["time_vs_sequential"] = row["seconds"] / sequential if sequential else None
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "children": children,
              "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "bf16": args.bf16, "tf32": args.tf32,
              "runs": rows}
    if args.profile:
        result["bare_step_ms"] = bare_step_ms(args)
    emit(result, args.output)
    if args.profile and args.output:
        profile_stacked_step(8, args, Path(args.output).with_name(f"{Path(args.output).stem}_profile.txt"))


if __name__ == "__main__":
    main()
