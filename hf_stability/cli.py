"""``hf-stability``: the command line (demo, train, analyze, report, push)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from .arguments import StabilityArguments
from .errors import HfStabilityError
from .recipe import parse_flags

COMMANDS = {
    "demo": "Fine-tune the packaged MiniLM on tweet sentiment and run a small butterfly study (offline).",
    "train": "Run a butterfly study of a text classifier: TrainingArguments + StabilityArguments flags.",
    "analyze": "Measure a run directory (L2, barriers, CKA, disagreement) -> RUN/analysis/report.json.",
    "report": "Render RUN/analysis/report.json into PNG plots and a model card (RUN/analysis/README.md).",
    "push": "Upload the report (and with --include_weights the final weights) to a Hub model repo.",
}


@dataclass
class PushArguments:
    """Options of ``hf-stability push RUN_DIR``."""

    repo_id: str = field(metadata={"help": "Hub repository: 'name' or 'namespace/name' (created if missing)."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    include_weights: bool = field(default=False, metadata={"help": "Also upload the final weights (safetensors)."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message on the Hub."})


def _usage() -> str:
    lines = ["usage: hf-stability <command> [--help] [options]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def _print_result(result) -> None:
    print()
    print(result.format_table())
    print()
    print(f"Run directory: {result.run_dir.resolve()}")


def _demo(argv: Sequence[str]) -> int:
    from .demo import DemoArguments, run_demo

    (demo,) = parse_flags(HfArgumentParser(DemoArguments, prog="hf-stability demo"), list(argv))
    result = run_demo(demo)
    _print_result(result)
    if demo.analyze:
        from .demo import analyze_demo

        report, files = analyze_demo(result.run_dir)
        print()
        print(_format_summary(report))
        _print_report_files(files)
    return 0


def _train(argv: Sequence[str]) -> int:
    from .recipe import parse_args
    from .tasks import TextClassificationArguments, build_text_classification_trainer

    parser = HfArgumentParser(
        (TextClassificationArguments, StabilityArguments, TrainingArguments), prog="hf-stability train"
    )
    task, stability, training = parse_args(parser, list(argv))
    _print_result(build_text_classification_trainer(task, stability, training).butterfly())
    return 0


SUMMARY_COLUMNS = (
    ("L2", "l2", 18),
    ("L2 aligned", "aligned_l2", 18),
    ("loss barrier", "loss_barrier_eval", 18),
    ("aligned", "aligned_loss_barrier_eval", 18),
    ("error barrier", "error_barrier_eval", 18),
    ("disagree", "disagreement", 16),
    ("amplification", "amplification", 16),
)


def _format_summary(report: dict) -> str:
    from .report.findings import format_value

    header = (f"{'spawn step':>10}  {'who':<9}  " + "  ".join(f"{title:>{width}}" for title, _, width in SUMMARY_COLUMNS)
              + f"  {'at the floor':>12}")
    lines = [header, "-" * len(header)]
    for row in report["summary"]:
        for who, values in (("control", row["control"]), ("children", row["children"])):
            if values:
                cells = "  ".join(format_value(values.get(key)).rjust(width) for _, key, width in SUMMARY_COLUMNS)
                # children within 2x of the control on every figure: indistinguishable from the noise floor
                floor = row.get("indistinguishable_from_floor")
                at_floor = f"{floor} of {row['num_children']}" if who == "children" and floor is not None else ""
                lines.append(f"{row['spawn_step']:>10}  {who:<9}  {cells}  {at_floor:>12}".rstrip())
    return "\n".join(lines)


def _analyze(argv: Sequence[str]) -> int:
    from accelerate import Accelerator

    from .analysis import AnalyzeArguments, analyze_run

    if not argv or argv[0].startswith("-"):
        print("usage: hf-stability analyze RUN_DIR [--eval_samples N] [--train_samples N] [--pairs parent-child|"
              "child-child|all] [--alphas 11] [--batch_size 64] [--pooling cls|mean|all] [--autocast none|bf16|fp16] "
              "[--alignment weight|activation|none] [--cpu]", file=sys.stderr)
        return 2
    run_dir, rest = argv[0], argv[1:]
    (args,) = parse_flags(HfArgumentParser(AnalyzeArguments, prog="hf-stability analyze"), list(rest))
    accelerator = Accelerator(cpu=args.cpu)
    try:
        report = analyze_run(run_dir, args, accelerator)
    finally:
        accelerator.end_training()
    if accelerator.is_main_process:
        print()
        print(_format_summary(report))
        print(f"\nReport: {(Path(run_dir) / 'analysis' / 'report.json').resolve()}")
    return 0


def _print_report_files(files) -> None:
    print(f"\nModel card: {files.card.resolve()}")
    print(f"Plots:      {files.card.parent.resolve() / 'plots'} ({', '.join(sorted(files.plots))})")


def _run_dir_and_rest(command: str, argv: Sequence[str], usage: str) -> tuple[str, list[str]] | None:
    if not argv or argv[0].startswith("-"):
        print(f"usage: hf-stability {command} RUN_DIR {usage}".rstrip(), file=sys.stderr)
        return None
    return argv[0], list(argv[1:])


def _report(argv: Sequence[str]) -> int:
    from .report import write_report

    parsed = _run_dir_and_rest("report", argv, "")
    if parsed is None:
        return 2
    run_dir, rest = parsed
    if rest:
        print(f"hf-stability report: unexpected arguments {rest}", file=sys.stderr)
        return 2
    _print_report_files(write_report(run_dir))
    return 0


def _push(argv: Sequence[str]) -> int:
    from .report import push_report

    parsed = _run_dir_and_rest("push", argv, "--repo-id NAME [--private] [--include-weights] [--commit-message M]")
    if parsed is None:
        return 2
    run_dir, rest = parsed
    (args,) = parse_flags(HfArgumentParser(PushArguments, prog="hf-stability push"), rest)
    url = push_report(run_dir, args.repo_id, private=args.private, include_weights=args.include_weights,
                      commit_message=args.commit_message)
    print(f"Pushed: {url}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    handlers = {"demo": _demo, "train": _train, "analyze": _analyze, "report": _report, "push": _push}
    if command not in handlers:
        print(f"hf-stability: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return handlers[command](rest)
    except HfStabilityError as err:
        print(f"hf-stability {command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
