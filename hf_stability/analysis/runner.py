"""analyze_run: every measure for every child of a run directory -> analysis/report.json.

Runs in one process or under ``accelerate launch`` (evaluation batches sharded, sums reduced,
only the main process writes). The report's schema is documented in docs/report_schema.md.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..atomic_io import read_jsonl, write_json
from ..errors import AnalysisDataError
from ..run_directory import RunDirectory
from .alignment import activation_matching, apply_permutation, permutation_spec, weight_matching
from .barrier import barriers
from .distance import l2_distance
from .evaluation import EvalData, EvalSums, Evaluator
from .loading import load_final_model, load_run_data, run_collator
from .noise_floor import compare_with_floor
from .representations import POOLINGS, compare_representations

logger = logging.getLogger(__name__)

REPORT_SCHEMA_VERSION = 3
PAIRS = ("parent-child", "child-child", "all")
ALIGNMENTS = ("weight", "activation", "none")
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class AnalyzeArguments:
    """Options of ``hf-stability analyze RUN_DIR``."""

    eval_split: str = field(
        default="eval", metadata={"help": "Saved split (RUN/data/<split>) used for eval barriers, CKA and disagreement."}
    )
    eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N examples of eval_split."})
    train_samples: int = field(default=512, metadata={"help": "Train-subset size for the train-set barriers (0: skip)."})
    pairs: str = field(default="parent-child", metadata={"help": f"Which pairs: {' | '.join(PAIRS)}."})
    alphas: int = field(default=11, metadata={"help": "Interpolation points in [0, 1]."})
    batch_size: int = field(default=64, metadata={"help": "Evaluation batch size per process."})
    pooling: str = field(default="cls", metadata={"help": f"Token pooling for CKA: {' | '.join(POOLINGS)}."})
    autocast: str = field(default="none", metadata={"help": "Evaluate under autocast: none | bf16 | fp16."})
    alignment: str = field(
        default="weight",
        metadata={"help": f"Permutation alignment before the aligned L2 and barriers: {' | '.join(ALIGNMENTS)}."},
    )
    alignment_seed: int = field(default=0, metadata={"help": "Seed of weight matching's order of groups."})
    alignment_samples: int = field(
        default=256, metadata={"help": "Examples for activation matching (from the train split, else eval_split)."}
    )
    cpu: bool = field(default=False, metadata={"help": "Evaluate on the CPU even when a GPU is present."})
    reanalyze: bool = field(
        default=False,
        metadata={"help": "Analyse again even when analysis/report.json already holds this run's analysis with "
                  "these arguments (by default such a report is reused, so a restarted study skips it)."},
    )

    def __post_init__(self) -> None:
        if self.pairs not in PAIRS:
            raise AnalysisDataError(f"Unknown pairs {self.pairs!r}: choose one of {', '.join(PAIRS)}.")
        if self.autocast not in AUTOCAST:
            raise AnalysisDataError(f"Unknown autocast {self.autocast!r}: choose one of {', '.join(AUTOCAST)}.")
        if self.alignment not in ALIGNMENTS:
            raise AnalysisDataError(f"Unknown alignment {self.alignment!r}: choose one of {', '.join(ALIGNMENTS)}.")
        if self.alignment_samples < 1:
            raise AnalysisDataError(f"alignment_samples must be >= 1, got {self.alignment_samples}.")
        if self.pooling not in POOLINGS:
            raise AnalysisDataError(f"Unknown pooling {self.pooling!r}: choose one of {', '.join(POOLINGS)}.")
        if self.alphas < 2:
            raise AnalysisDataError(f"alphas must be >= 2, got {self.alphas}.")
        if self.train_samples < 0 or (self.eval_samples is not None and self.eval_samples < 1):
            raise AnalysisDataError("train_samples must be >= 0 and eval_samples >= 1.")


def _mean_std(values: list[float]) -> dict[str, Any]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(finite), "std": statistics.pstdev(finite) if len(finite) > 1 else 0.0, "n": len(finite)}


def _scalars(pair: dict[str, Any]) -> dict[str, float | None]:
    out = {"l2": pair["l2"]["l2"], "relative_l2": pair["l2"]["relative"], "amplification": pair.get("amplification")}
    for split, metrics in pair["barriers"].items():
        for metric, result in metrics.items():
            out[f"{metric}_barrier_{split}"] = result["barrier"]
    aligned = pair.get("aligned")
    if aligned:
        out["aligned_l2"] = aligned["l2"]["l2"]
        out["aligned_relative_l2"] = aligned["l2"]["relative"]
        for split, metrics in aligned["barriers"].items():
            for metric, result in metrics.items():
                out[f"aligned_{metric}_barrier_{split}"] = result["barrier"]
    out["disagreement"] = pair["disagreement"]
    defined = [v for v in pair["cka"]["values"] if v is not None]
    out["cka_mean"] = statistics.fmean(defined) if defined else None
    return out


def _perturbation_l2(run: RunDirectory, spawn_step: int, child: int) -> float:
    """L2 norm of the change a child's perturbation made (0 for the control and for kinds that
    change no weight)."""
    path = run.child_dir(spawn_step, child) / "perturbation.json"
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return float(record.get("change_l2") or 0.0)


def _existing_report(run: RunDirectory, children: list[tuple[int, int]], inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The run's report.json when it was made from the same run, ``children`` ((spawn step, child)
    pairs) and arguments (and this schema), after every final model was written; None otherwise.
    The file is written atomically, so a report that exists is whole."""
    path = run.analysis_dir / "report.json"
    if not path.is_file():
        return None
    finals = [run.parent_final] + [run.child_final(t, k) for t, k in children]
    weights = [f for final in finals if final.is_dir() for f in final.glob("*.safetensors")]
    if any(f.stat().st_mtime_ns > path.stat().st_mtime_ns for f in weights):
        return None  # a model was trained again since
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if report.get("schema_version") != REPORT_SCHEMA_VERSION or report.get("inputs") != inputs:
        return None
    return report


def _first(dataset: Any, n: int) -> Any:
    """The first ``n`` examples of a ``datasets.Dataset`` or of any sequence of feature dicts."""
    n = min(n, len(dataset))
    return dataset.select(range(n)) if hasattr(dataset, "select") else dataset[:n]


def _from_main_process(value: Any, evaluator: Evaluator) -> Any:
    """The main process's ``value`` on every process (so that all ranks align identically)."""
    if evaluator.num_processes <= 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def analyze_run(
    run_dir: str | Path,
    args: AnalyzeArguments | None = None,
    accelerator: Any = None,
    eval_data: Any = None,
    train_data: Any = None,
    collate_fn: Any = None,
) -> dict[str, Any]:
    """Measure every finished child of ``run_dir`` against its parent (and/or its siblings) and
    write ``analysis/report.json`` (main process). Returns the report."""
    args = args or AnalyzeArguments()
    run = RunDirectory(run_dir)
    config = run.load_config()
    status = {(t, k): run.child_status(t, k) for t in config["spawn_steps"] for k in config["children"]}
    inputs = {
        "arguments": {k: v for k, v in asdict(args).items() if k != "reanalyze"},
        "fingerprint": config.get("fingerprint"),
        "children": {f"t{t}/c{k}": state for (t, k), state in status.items()},
    }
    if not args.reanalyze and eval_data is None and train_data is None and collate_fn is None:
        done = _existing_report(run, list(status), inputs)
        if done is not None:
            logger.info("%s already holds this analysis (same run, children and arguments): reused; pass "
                        "--reanalyze to measure again.", run.analysis_dir / "report.json")
            return done
    evaluator = Evaluator(accelerator=accelerator, device="cpu" if args.cpu else None, autocast_dtype=AUTOCAST[args.autocast])
    collate = collate_fn or run_collator(run)
    eval_dataset = eval_data if eval_data is not None else load_run_data(run, args.eval_split)
    if args.eval_samples is not None:
        eval_dataset = _first(eval_dataset, args.eval_samples)
    splits = {"eval": EvalData(eval_dataset, batch_size=args.batch_size, collate_fn=collate, name="eval")}
    if args.train_samples > 0:
        train_dataset = train_data if train_data is not None else load_run_data(run, "train")
        train_dataset = _first(train_dataset, args.train_samples)
        splits["train"] = EvalData(train_dataset, batch_size=args.batch_size, collate_fn=collate, name="train")

    parent = load_final_model(run.parent_final)
    spec = permutation_spec(parent) if args.alignment != "none" else None  # unsupported: stop before any work
    alignment_data = None
    if args.alignment == "activation":
        source = splits.get("train", splits["eval"])
        alignment_data = EvalData(_first(source.dataset, args.alignment_samples), batch_size=args.batch_size,
                                  collate_fn=collate, name=f"alignment ({source.name})")
    cache: dict[tuple[str, str], EvalSums] = {}

    def sums_of(name: str, model: torch.nn.Module, split: str) -> EvalSums:
        if (name, split) not in cache:
            cache[(name, split)] = evaluator.evaluate(model, splits[split])
        return cache[(name, split)]

    def measure(name_a: str, a: torch.nn.Module, name_b: str, b: torch.nn.Module) -> dict[str, Any]:
        result: dict[str, Any] = {"a": name_a, "b": name_b}
        distance = l2_distance(a, b, per_layer=True)
        result["l2"] = {"l2": distance.l2, "relative": distance.relative, "per_layer": distance.per_layer}
        result["barriers"] = {}
        for split, data in splits.items():
            found = barriers(
                a, b, data, ("loss", "error"), args.alphas, evaluator,
                endpoints=(sums_of(name_a, a, split), sums_of(name_b, b, split)),
            )
            result["barriers"][split] = {metric: r.to_dict() for metric, r in found.items()}
        representation = compare_representations(a, b, splits["eval"], args.pooling, evaluator)
        values = [v if math.isfinite(v) else None for v in representation.cka]  # None: undefined (no variance)
        result["cka"] = {"pooling": args.pooling, "layers": representation.layers, "values": values}
        result["disagreement"] = representation.disagreement
        result["aligned"] = align(name_a, a, name_b, b) if spec is not None else None
        return result

    def align(name_a: str, a: torch.nn.Module, name_b: str, b: torch.nn.Module) -> dict[str, Any]:
        """L2 and barriers after permuting b's hidden units to match a. The aligned b computes b's
        function, so b's own sums serve as the far endpoint."""
        if args.alignment == "weight":
            match = weight_matching(a, b, spec, seed=args.alignment_seed, device=evaluator.device)
        else:
            match = activation_matching(a, b, spec, alignment_data, evaluator=evaluator)
        match.permutation = _from_main_process(match.permutation, evaluator)
        aligned_b = apply_permutation(b, match.permutation, spec)
        distance = l2_distance(a, aligned_b, per_layer=True)
        found = {
            split: barriers(a, aligned_b, data, ("loss", "error"), args.alphas, evaluator,
                            endpoints=(sums_of(name_a, a, split), sums_of(name_b, b, split)))
            for split, data in splits.items()
        }
        return {
            **match.to_dict(),
            "l2": {"l2": distance.l2, "relative": distance.relative, "per_layer": distance.per_layer},
            "barriers": {split: {m: r.to_dict() for m, r in results.items()} for split, results in found.items()},
        }

    stability = config["stability_arguments"]
    control = 0 if stability.get("control_child") else None
    perturbation_l2s = {(t, k): _perturbation_l2(run, t, k) for t, k in status}
    pairs: list[dict[str, Any]] = []
    diverged: list[dict[str, Any]] = []
    for t in config["spawn_steps"]:
        children: dict[int, torch.nn.Module] = {}
        for k in config["children"]:
            if status[t, k] == "diverged":
                info = json.loads((run.child_dir(t, k) / "diverged.json").read_text(encoding="utf-8"))
                diverged.append({"spawn_step": t, "child": k, **info})
            elif status[t, k] == "done":
                children[k] = load_final_model(run.child_final(t, k))
            else:
                logger.warning("Child %d of spawn step %d has not finished; it is left out.", k, t)
        jobs: list[tuple[str, int | None, int]] = []
        if args.pairs in ("parent-child", "all"):
            jobs += [("parent-child", None, k) for k in children]
        if args.pairs in ("child-child", "all"):
            perturbed = [k for k in children if k != control]
            jobs += [("child-child", i, j) for i, j in itertools.combinations(perturbed, 2)]
        for kind, i, j in jobs:
            name_a = "parent" if i is None else f"t{t}/c{i}"
            model_a = parent if i is None else children[i]
            pair = measure(name_a, model_a, f"t{t}/c{j}", children[j])
            perturbation_l2 = perturbation_l2s[t, j]
            pair.update(
                spawn_step=t,
                kind=kind,
                child=j,
                is_control=(j == control) and kind == "parent-child",
                noise_floor=None,  # filled below for perturbed parent-child pairs
                perturbation_l2=perturbation_l2,
                amplification=pair["l2"]["l2"] / perturbation_l2 if kind == "parent-child" and perturbation_l2 > 0 else None,
            )
            pairs.append(pair)

    divergence = []
    for t in config["spawn_steps"]:
        for k in config["children"]:
            records = read_jsonl(run.child_dir(t, k) / "divergence.jsonl")
            divergence.append({"spawn_step": t, "child": k, "is_control": k == control,
                               "perturbation_l2": perturbation_l2s[t, k],
                               "steps": [r["step"] for r in records], "l2": [r["l2"] for r in records]})

    summary = []
    for t in config["spawn_steps"]:
        mine = [p for p in pairs if p["spawn_step"] == t and p["kind"] == "parent-child"]
        controls = [_scalars(p) for p in mine if p["is_control"]]
        floor = controls[0] if controls else None
        perturbed = []
        for pair in mine:
            if not pair["is_control"]:
                perturbed.append(_scalars(pair))
                pair["noise_floor"] = compare_with_floor(perturbed[-1], floor)
        at_floor = [pair["noise_floor"]["indistinguishable"] for pair in mine if pair["noise_floor"] is not None]
        keys = list(perturbed[0]) if perturbed else []
        summary.append(
            {
                "spawn_step": t,
                "num_children": len(perturbed),
                "control": floor,
                "children": {key: _mean_std([row[key] for row in perturbed]) for key in keys},
                "indistinguishable_from_floor": None if floor is None else sum(at_floor),
            }
        )

    model_class = config.get("identity", {}).get("model", {}).get("class")
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "generated_by": f"hf_stability {__version__}",
        "inputs": inputs,
        "run": {
            "fingerprint": config.get("fingerprint"),
            "max_steps": config["max_steps"],
            "spawn_steps": config["spawn_steps"],
            "children": config["children"],
            "control_child": control,
            "perturbations": config["perturbations"],
            "model": model_class,
            "task": "image-classification" if "Image" in (model_class or "") else "text-classification",
            "base_model": stability.get("base_model"),
            "dataset_name": stability.get("dataset_name"),
        },
        "settings": {
            "alphas": args.alphas,
            "train_samples": len(splits["train"]) if "train" in splits else 0,
            "eval_split": args.eval_split if eval_data is None else "given",
            "eval_samples": len(splits["eval"]),
            "pairs": args.pairs,
            "pooling": args.pooling,
            "batch_size": args.batch_size,
            "autocast": args.autocast,
            "num_processes": evaluator.num_processes,
            "alignment": {
                "method": args.alignment,
                "seed": args.alignment_seed if args.alignment == "weight" else None,
                "samples": len(alignment_data) if alignment_data is not None else None,
                "architecture": spec.architecture if spec is not None else None,
            },
        },
        "parent": {split: {"loss": sums_of("parent", parent, split).loss, "error": sums_of("parent", parent, split).error}
                   for split in splits},
        "pairs": pairs,
        "diverged": diverged,
        "divergence": divergence,
        "summary": summary,
    }
    if evaluator.is_main_process:
        write_json(run.analysis_dir / "report.json", report)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return report
