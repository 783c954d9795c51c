"""analyze_run: every measure for every child of a run directory -> analysis/report.json.

Runs in one process or under ``accelerate launch`` (evaluation batches sharded, sums reduced,
only the main process writes). The report's schema is documented in docs/report_schema.md.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..adapters import adapter_tensors, adapter_type, is_peft_model
from ..atomic_io import write_json
from ..errors import RunDirectoryError, UnsupportedArchitectureError
from ..run_directory import RunDirectory
from ..run_files import read_json
from .alignment import activation_matching, apply_permutation, permutation_spec, weight_matching
from .arguments import AlignmentMethod, AnalyzeArguments, Pairs, PeftPath
from .distance import l2_between, l2_distance
from .evaluation import EvalData, EvalSums, Evaluator
from .heads import Head, pipeline_task
from .inputs import ChildInputs, RunInputs
from .loading import load_run_data, load_run_model, run_collator
from .noise_floor import compare_with_floor
from .path_barriers import BUILTIN_METRICS, barriers
from .representations import compare_representations, resolve_readout
from .schema import REPORT_SCHEMA_VERSION, Report
from .timing import StageTimer

logger = logging.getLogger(__name__)

#: The suffix of a PEFT model's merged weights among the analysis's models ("parent@merged").
MERGED = "@merged"


def _mean_std(values: list[float]) -> dict[str, Any]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.pstdev(finite) if len(finite) > 1 else 0.0
    return {"mean": statistics.fmean(finite), "std": std, "n": len(finite)}


def _scalars(pair: dict[str, Any]) -> dict[str, float | None]:
    out = {"l2": pair["l2"]["l2"], "relative_l2": pair["l2"]["relative"], "amplification": pair.get("amplification")}
    merged = pair.get("merged_l2")
    if merged:  # a PEFT study: l2 is the adapters', merged_l2 (and the aligned L2) the merged models'
        out["merged_l2"] = merged["l2"]
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


def _earlier_report(run: RunDirectory) -> dict[str, Any]:
    """The run's report.json of this schema, whose pairs may be reused ({} when there is none, or
    when it cannot be read: it is then measured anew)."""
    path = run.report_file
    if not path.is_file():
        return {}
    try:
        report = read_json(path, "")
    except RunDirectoryError:
        logger.warning("%s cannot be read: every pair is measured again.", path)
        return {}
    return report if report.get("schema_version") == REPORT_SCHEMA_VERSION else {}


def _alignment(model: torch.nn.Module, asked: AlignmentMethod) -> tuple[AlignmentMethod, Any, str | None]:
    """(method, spec, why it was skipped): ``auto`` is weight matching where the architecture has a
    permutation spec and none elsewhere, with the reason; an explicit method without a spec raises."""
    if asked == AlignmentMethod.NONE:
        return asked, None, None
    try:
        spec = permutation_spec(model)
    except UnsupportedArchitectureError as err:
        if asked != AlignmentMethod.AUTO:
            raise
        logger.warning("Alignment is skipped: %s", err)
        return AlignmentMethod.NONE, None, str(err).split(". ")[0] + "."
    return (AlignmentMethod.WEIGHT if asked == AlignmentMethod.AUTO else asked), spec, None


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
    model_class: type | None = None,
) -> Report:
    """Measure every finished child of ``run_dir`` against its parent (and/or its siblings) and
    write ``analysis/report.json`` (main process). Returns the report. ``eval_data``,
    ``train_data`` and ``collate_fn`` replace what the run saved; ``model_class`` is the class
    its final/ models load with (default: the concrete transformers class config.json names).

    Every file read is first checked against the checksums its run recorded. A pair of an
    earlier report is reused when its inputs (the checksums of both models, their records and
    the data, the arguments) are unchanged; the others are measured. Models are loaded one child
    at a time: at most the parent, one child (two for child-child pairs) and the interpolation
    buffer are in memory.

    Raises:
        RunInUseError: another process is writing the run directory.
        RunDirectoryError: the run directory is missing, damaged or of another format.
        AnalysisDataError: the saved data cannot be evaluated.
    """
    from ..run_lock import locked_run_on_main

    with locked_run_on_main(run_dir, "analyze", accelerator):
        analysis = _Analysis(run_dir, args or AnalyzeArguments(), accelerator, eval_data, train_data, collate_fn,
                             model_class)
        try:
            return analysis.analyze()
        finally:
            analysis.inputs.close()


class _Analysis:
    """One analysis of a run directory (analyze_run's state: the loaded models, the sums cache)."""

    def __init__(self, run_dir, args, accelerator, eval_data, train_data, collate_fn, model_class):
        self.run = RunDirectory(run_dir)
        self.args, self.accelerator, self.model_class = args, accelerator, model_class
        self.given = {"eval_data": eval_data, "train_data": train_data, "collate_fn": collate_fn}
        given = any(v is not None for v in self.given.values()) or model_class is not None
        self.timer = StageTimer()
        with self.timer.stage("read the run directory"):
            self.inputs = RunInputs.read(self.run, verify_data=eval_data is None or train_data is None)
        self.config = self.inputs.config
        # what every measure depends on besides the models: the arguments (and data that was passed in,
        # which is never reused: it has no checksum)
        self.arguments = json.loads(json.dumps({k: v for k, v in asdict(args).items() if k != "reanalyze"}))
        self.reusable = not args.reanalyze and not given
        self.earlier = _earlier_report(self.run) if self.reusable else {}
        self.earlier_pairs = {(p.get("kind"), p.get("a"), p.get("b"), p.get("inputs")): p
                              for p in self.earlier.get("pairs", []) if isinstance(p, dict)}
        self.stability = self.config["stability_arguments"]
        self.control = 0 if self.stability.get("control_child") else None
        self._ready = False
        self._models: dict[str, torch.nn.Module] = {}
        self._sums: dict[tuple[str, str], EvalSums] = {}

    # ---- data and models (loaded only when a pair must be measured) ---------------------------
    def _prepare(self) -> None:
        if self._ready:
            return
        args, run = self.args, self.run
        self.evaluator = Evaluator(accelerator=self.accelerator, device="cpu" if args.cpu else None,
                                   autocast_dtype=args.autocast.dtype, weights_dtype=args.autocast.weights_dtype)
        self.timer.device = self.evaluator.device
        with self.timer.stage("load and collate data"):
            if self.given["eval_data"] is None or self.given["train_data"] is None:
                self.verify("data")
            collate = self.given["collate_fn"] or run_collator(run)
            eval_dataset = self.given["eval_data"]
            if eval_dataset is None:
                eval_dataset = load_run_data(run, args.eval_split)
            if args.eval_samples is not None:
                eval_dataset = _first(eval_dataset, args.eval_samples)
            self.splits = {"eval": EvalData(eval_dataset, batch_size=args.batch_size, collate_fn=collate,
                                            name="eval")}
            if args.train_samples > 0:
                train = self.given["train_data"] if self.given["train_data"] is not None \
                    else load_run_data(run, "train")
                self.splits["train"] = EvalData(_first(train, args.train_samples), batch_size=args.batch_size,
                                                collate_fn=collate, name="train")
            for data in self.splits.values():  # collated once, here, for every model and point
                for index in data.shard(self.evaluator.process_index, self.evaluator.num_processes):
                    data.batch(index)
        parent = self.model("parent")
        self.peft = is_peft_model(parent)
        self.head = self.evaluator.head(parent, self.splits["eval"])
        self.readout = resolve_readout(parent, args.pooling)
        # alignment and CKA read the merged model of a PEFT study (an adapter has no hidden units of its own)
        self.method, self.spec, self.alignment_skipped = _alignment(self.model(self.merged("parent")),
                                                                    args.alignment)
        self.alignment_data = None
        if self.method == AlignmentMethod.ACTIVATION:
            source = self.splits.get("train", self.splits["eval"])
            self.alignment_data = EvalData(_first(source.dataset, args.alignment_samples), batch_size=args.batch_size,
                                           collate_fn=collate, name=f"alignment ({source.name})")
        self._ready = True

    def model(self, name: str) -> torch.nn.Module:
        """A model by name: "parent", "t<t>/c<k>", and for a PEFT study "<name>@merged" (its
        adapter merged into a copy of the base)."""
        if name not in self._models:
            self.timer.mark_startup()
            self.verify(name.removesuffix(MERGED), "base")
            with self.timer.stage("load models"):
                if name.endswith(MERGED):
                    self._models[name] = copy.deepcopy(self.model(name[: -len(MERGED)])).merge_and_unload()
                elif name == "parent":
                    self._models[name] = load_run_model(self.run, self.run.parent_final, self.model_class)
                else:
                    t, k = (int(part[1:]) for part in name.split("/"))
                    self._models[name] = load_run_model(self.run, self.run.child_final(t, k), self.model_class)
        return self._models[name]

    def verify(self, *parts: str) -> None:
        """Wait for the checksums of ``parts`` and compare them with their records (RunInputs.verify)."""
        with self.timer.stage("verify checksums"):
            self.inputs.verify(*parts)

    def merged(self, name: str) -> str:
        """The name of the model's merged weights (a PEFT study), or the model itself."""
        return name + MERGED if self.peft else name

    def keep_only(self, *names: str) -> None:
        """Free every loaded child but ``names`` (the parent stays)."""
        keep = {"parent", self.merged("parent") if self._ready else "parent"}
        keep |= set(names) | {n + MERGED for n in names}
        for name in [n for n in self._models if n not in keep]:
            del self._models[name]

    def sums(self, name: str, split: str) -> EvalSums:
        if (name, split) not in self._sums:
            model = self.model(name)
            with self.timer.stage("evaluate endpoints"):
                self._sums[(name, split)] = self.evaluator.evaluate(model, self.splits[split])
        return self._sums[(name, split)]

    # ---- measures ----------------------------------------------------------------------------
    def measure(self, name_a: str, name_b: str) -> dict[str, Any]:
        """Every measure of a pair. For a PEFT study: L2 of the adapters and of the merged weights,
        barriers along the line of ``peft_path``, CKA and alignment on the merged models."""
        args, splits, timer = self.args, self.splits, self.timer
        a, b = self.model(name_a), self.model(name_b)
        result: dict[str, Any] = {"a": name_a, "b": name_b}
        with timer.stage("L2"):
            # a PEFT study's L2 is that of what trains: the adapters (the base is the same in every model)
            distance = l2_between(adapter_tensors(a), adapter_tensors(b), True) if self.peft \
                else l2_distance(a, b, True)
            result["l2"] = {"l2": distance.l2, "relative": distance.relative, "per_layer": distance.per_layer}
            if self.peft:
                merged = l2_distance(self.model(self.merged(name_a)), self.model(self.merged(name_b)),
                                     per_layer=True)
                result["merged_l2"] = {"l2": merged.l2, "relative": merged.relative, "per_layer": merged.per_layer}
        path_a, path_b = (self.merged(name_a), self.merged(name_b)) if args.peft_path == PeftPath.MERGED \
            else (name_a, name_b)
        result["barriers"] = {}
        for split, data in splits.items():
            endpoints = (self.sums(path_a, split), self.sums(path_b, split))
            with timer.stage("barriers"):
                found = barriers(self.model(path_a), self.model(path_b), data, BUILTIN_METRICS, args.alphas,
                                 self.evaluator, endpoints=endpoints)
            result["barriers"][split] = {metric: r.to_dict() for metric, r in found.items()}
        seen_a, seen_b = self.merged(name_a), self.merged(name_b)
        with timer.stage("CKA and disagreement"):
            representation = compare_representations(self.model(seen_a), self.model(seen_b), splits["eval"],
                                                     self.readout.pooling, self.evaluator)
        values = [v if math.isfinite(v) else None for v in representation.cka]  # None: undefined (no variance)
        result["cka"] = {"pooling": representation.pooling, "layers": representation.layers, "values": values}
        result["disagreement"] = representation.disagreement
        aligned = None
        if self.spec is not None:
            aligned = self.align(seen_a, self.model(seen_a), seen_b, self.model(seen_b))
        result["aligned"] = aligned
        return result

    def align(self, name_a: str, a: torch.nn.Module, name_b: str, b: torch.nn.Module) -> dict[str, Any]:
        """L2 and barriers after permuting b's hidden units to match a. The aligned b computes b's
        function, so b's own sums serve as the far endpoint. b is permuted in place (no second copy
        in memory) and dropped afterwards."""
        args, evaluator, timer = self.args, self.evaluator, self.timer
        with timer.stage(f"alignment ({self.method.value} matching)"):
            if self.method == AlignmentMethod.WEIGHT:
                match = weight_matching(a, b, self.spec, seed=args.alignment_seed, device=evaluator.device)
            else:
                match = activation_matching(a, b, self.spec, self.alignment_data, evaluator=evaluator)
            match.permutation = _from_main_process(match.permutation, evaluator)
        for split in self.splits:
            self.sums(name_b, split)  # b's own endpoint sums, before its weights are permuted
        with timer.stage(f"alignment ({self.method.value} matching)"):
            aligned_b = apply_permutation(b, match.permutation, self.spec, in_place=True)
        self._models.pop(name_b)  # its weights are now permuted: reloaded if needed again
        with timer.stage("L2"):
            distance = l2_distance(a, aligned_b, per_layer=True)
        found = {}
        for split, data in self.splits.items():
            endpoints = (self.sums(name_a, split), self.sums(name_b, split))
            with timer.stage("aligned barriers"):
                found[split] = barriers(a, aligned_b, data, ("loss", "error"), args.alphas, evaluator,
                                        endpoints=endpoints)
        return {
            **match.to_dict(),
            "l2": {"l2": distance.l2, "relative": distance.relative, "per_layer": distance.per_layer},
            "barriers": {split: {m: r.to_dict() for m, r in results.items()} for split, results in found.items()},
        }

    def cross_check(self, child: ChildInputs, pair: dict[str, Any]) -> None:
        """The final L2 the child measured during training must be the one measured now: a mismatch
        means the weights on disk are not the ones that were trained."""
        trained = child.trained_l2(self.config["max_steps"])
        measured = pair["l2"]["l2"]
        if trained is None or math.isclose(trained, measured, rel_tol=1e-6, abs_tol=1e-9):
            return
        raise RunDirectoryError(
            f"{self.run.child_dir(child.spawn_step, child.child)}: the analyzer measures an L2 of {measured:.6g} "
            f"between this child's and the parent's final weights, and the child measured {trained:.6g} at the "
            f"same step during training: the weights on disk are not the ones that were trained (one of the two "
            f"final/ folders was damaged or replaced). {self.run.child_remedy(child.spawn_step, child.child)} "
            f"If every child disagrees, it is the parent: {self.run.parent_remedy()}"
        )

    # ---- the whole analysis ------------------------------------------------------------------
    def jobs(self, t: int) -> list[tuple[str, str, str, ChildInputs]]:
        """(kind, a, b, child of b) of spawn step t, in the order they are measured."""
        done = [c for (s, _), c in self.inputs.children.items() if s == t and c.status == "done"]
        for c in self.inputs.children.values():
            if c.spawn_step == t and c.status == "pending":
                logger.warning("Child %d of spawn step %d has not finished; it is left out.", c.child, t)
        jobs = []
        if self.args.pairs in (Pairs.PARENT_CHILD, Pairs.ALL):
            jobs += [("parent-child", "parent", c.name, c) for c in done]
        if self.args.pairs in (Pairs.CHILD_CHILD, Pairs.ALL):
            perturbed = [c for c in done if c.child != self.control]  # pairs within a group: one perturbation
            jobs += [("child-child", i.name, j.name, j) for i, j in itertools.combinations(perturbed, 2)
                     if i.group == j.group]
        return jobs

    def analyze(self) -> Report:
        run, config = self.run, self.config
        run.own_folder(run.analysis_dir)  # a write that cannot happen fails now, not after the whole analysis
        pairs: list[dict[str, Any]] = []
        measured = 0
        for t in config["spawn_steps"]:
            for kind, name_a, name_b, child in self.jobs(t):
                key = self.inputs.pair_fingerprint(self.arguments, name_a, name_b)
                pair = self.earlier_pairs.get((kind, name_a, name_b, key))
                if pair is None:
                    self._prepare()
                    self.keep_only(name_a, name_b)
                    pair = self.measure(name_a, name_b)
                    measured += 1
                    pair.update(
                        inputs=key,
                        spawn_step=t,
                        kind=kind,
                        child=child.child,
                        is_control=(child.child == self.control) and kind == "parent-child",
                        noise_floor=None,  # filled below for perturbed parent-child pairs
                        perturbation_l2=child.perturbation_l2,
                        amplification=(pair["l2"]["l2"] / child.perturbation_l2
                                       if kind == "parent-child" and child.perturbation_l2 > 0 else None),
                    )
                pair.update(group=child.group, reference=child.reference,
                            perturbation_size=child.relative_size if kind == "parent-child" else None)
                if kind == "parent-child":
                    self.cross_check(child, pair)
                pairs.append(pair)
        self.keep_only()
        with self.timer.stage("verify checksums"):
            self.inputs.verify_all()  # every file the report stands on, the reused pairs' included
        with self.timer.stage("report"):
            report = self.report(pairs)
        logger.info("Measured %d pair(s); reused %d of the earlier report, whose inputs are unchanged.", measured,
                    len(pairs) - measured)
        main = self.accelerator is None or self.accelerator.is_main_process
        if main:
            run.remove_temporaries()  # a killed analysis's leftovers (the lock is ours)
            if report != self.earlier or self.args.reanalyze:  # an unchanged report is not rewritten
                write_json(run.report_file, report)
            self.timer.log()
            write_json(run.timings_file, {**self.timer.to_dict(), "pairs_measured": measured,
                                          "pairs_reused": len(pairs) - measured})
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        return Report.from_dict(report, str(run.report_file))

    def parent_section(self) -> dict[str, Any]:
        key = self.inputs.parent_fingerprint(self.arguments)
        earlier = self.earlier.get("parent")
        if isinstance(earlier, dict) and self.earlier.get("inputs", {}).get("parent") == key:
            return earlier
        self._prepare()
        return {split: {"loss": self.sums("parent", split).loss, "error": self.sums("parent", split).error}
                for split in self.splits}

    def report(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        config, inputs = self.config, self.inputs
        for pair in pairs:
            pair["noise_floor"] = None
        summary = []
        for t in config["spawn_steps"]:
            mine = [p for p in pairs if p["spawn_step"] == t and p["kind"] == "parent-child"]
            controls = [_scalars(p) for p in mine if p["is_control"]]
            floor = controls[0] if controls else None
            groups = list(dict.fromkeys(p["group"] for p in mine if not p["is_control"])) or ["control"]
            for group in groups:  # one row per perturbation of the step (references last, as planned)
                members = [p for p in mine if not p["is_control"] and p["group"] == group]
                perturbed = []
                for pair in members:
                    perturbed.append(_scalars(pair))
                    pair["noise_floor"] = compare_with_floor(perturbed[-1], floor)
                at_floor = [pair["noise_floor"]["indistinguishable"] for pair in members]
                keys = list(perturbed[0]) if perturbed else []
                sizes = [p["perturbation_size"] for p in members]
                summary.append({
                    "spawn_step": t,
                    "group": group,
                    "reference": members[0]["reference"] if members else None,
                    "perturbation_size": _mean_std(sizes)["mean"],
                    "num_children": len(perturbed),
                    "control": floor,
                    "children": {key: _mean_std([row[key] for row in perturbed]) for key in keys},
                    "indistinguishable_from_floor": None if floor is None else sum(at_floor),
                })
        divergence = [
            {"spawn_step": c.spawn_step, "child": c.child, "is_control": c.child == self.control,
             "group": c.group, "reference": c.reference, "perturbation_l2": c.perturbation_l2,
             "steps": [r["step"] for r in c.divergence], "l2": [r["l2"] for r in c.divergence]}
            for c in inputs.children.values()
        ]
        diverged = [{"spawn_step": c.spawn_step, "child": c.child, **c.diverged}
                    for c in inputs.children.values() if c.diverged is not None]
        parent = self.parent_section()
        settings = self.settings()
        model_class = config.get("identity", {}).get("model", {}).get("class")
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "generated_by": f"hf_stability {__version__}",
            "inputs": {"arguments": self.arguments, "fingerprint": config["fingerprint"],
                       "parent": inputs.parent_fingerprint(self.arguments),
                       "children": {c.name: c.status for c in inputs.children.values()}},
            "run": {
                "fingerprint": config["fingerprint"],
                "max_steps": config["max_steps"],
                "spawn_steps": config["spawn_steps"],
                "children": config["children"],
                "control_child": self.control,
                "perturbations": config["perturbations"],
                "references": config.get("references", {}),
                "model": model_class,
                "task": pipeline_task(model_class),
                "base_model": self.stability.get("base_model"),
                "dataset_name": self.stability.get("dataset_name"),
            },
            "settings": settings,
            "parent": parent,
            "pairs": pairs,
            "diverged": diverged,
            "divergence": divergence,
            "summary": summary,
        }

    def settings(self) -> dict[str, Any]:
        processes = self.accelerator.num_processes if self.accelerator is not None else 1
        earlier = self.earlier.get("settings")
        if not self._ready and isinstance(earlier, dict):  # nothing measured: every pair was reused
            return {**earlier, "num_processes": processes}
        self._prepare()
        args, splits = self.args, self.splits
        return {
            "alphas": args.alphas,
            "train_samples": len(splits["train"]) if "train" in splits else 0,
            "eval_split": args.eval_split if self.given["eval_data"] is None else "given",
            "eval_samples": len(splits["eval"]),
            "pairs": args.pairs.value,
            "pooling": self.readout.pooling.value,
            "readout": self.readout.reason,
            "head": {"name": self.head.name,
                     "loss": "the model's own loss from its labels" + (
                         ", in float32 from the bf16 model's logits where it agrees with the model's own"
                         if args.autocast.weights_dtype
                         and type(self.head).fp32_loss is not Head.fp32_loss else ""),
                     "error": self.head.error_rule, "perplexity": self.head.perplexity_rule},
            "batch_size": args.batch_size,
            "autocast": args.autocast.value,
            "num_processes": processes,
            "peft": ({"adapter": adapter_type(self.model("parent")), "path": args.peft_path.value}
                     if self.peft else None),
            "alignment": {
                "method": self.method.value,
                "skipped": self.alignment_skipped,
                "seed": args.alignment_seed if self.method == AlignmentMethod.WEIGHT else None,
                "samples": len(self.alignment_data) if self.alignment_data is not None else None,
                "architecture": self.spec.architecture if self.spec is not None else None,
            },
        }
