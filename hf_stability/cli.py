"""``hf-stability``: the command line (demo, train)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from .arguments import StabilityArguments
from .errors import HfStabilityError

COMMANDS = {
    "demo": "Fine-tune the packaged MiniLM on tweet sentiment and run a small butterfly study (offline).",
    "train": "Run a butterfly study of a text classifier: TrainingArguments + StabilityArguments flags.",
    "analyze": "Measure a run directory (L2, barriers, CKA, disagreement) -> RUN/analysis/report.json.",
}


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

    (demo,) = HfArgumentParser(DemoArguments, prog="hf-stability demo").parse_args_into_dataclasses(list(argv))
    _print_result(run_demo(demo))
    return 0


def _train(argv: Sequence[str]) -> int:
    from .tasks import TextClassificationArguments, build_text_classification_trainer

    parser = HfArgumentParser(
        (TextClassificationArguments, StabilityArguments, TrainingArguments), prog="hf-stability train"
    )
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        loader = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
        task, stability, training = loader(argv[0])
    else:
        task, stability, training = parser.parse_args_into_dataclasses(list(argv))
    _print_result(build_text_classification_trainer(task, stability, training).butterfly())
    return 0


SUMMARY_COLUMNS = (
    ("L2", "l2", 10),
    ("L2 aligned", "aligned_l2", 10),
    ("loss barrier", "loss_barrier_eval", 18),
    ("aligned", "aligned_loss_barrier_eval", 18),
    ("error barrier", "error_barrier_eval", 18),
    ("disagree", "disagreement", 9),
)


def _cell(value, width: int) -> str:
    """A control's number, or a children's {mean, std} cell; n/a where the report has none."""
    if isinstance(value, dict):
        text = f"{value['mean']:.4g} +- {value['std']:.2g}" if value.get("mean") is not None else "n/a"
    else:
        text = f"{value:.4g}" if value is not None else "n/a"
    return text.rjust(width)


def _format_summary(report: dict) -> str:
    header = f"{'spawn step':>10}  {'who':<9}  " + "  ".join(f"{title:>{width}}" for title, _, width in SUMMARY_COLUMNS)
    lines = [header, "-" * len(header)]
    for row in report["summary"]:
        for who, values in (("control", row["control"]), ("children", row["children"])):
            if values:
                cells = "  ".join(_cell(values.get(key), width) for _, key, width in SUMMARY_COLUMNS)
                lines.append(f"{row['spawn_step']:>10}  {who:<9}  {cells}")
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
    (args,) = HfArgumentParser(AnalyzeArguments, prog="hf-stability analyze").parse_args_into_dataclasses(list(rest))
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    handlers = {"demo": _demo, "train": _train, "analyze": _analyze}
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
