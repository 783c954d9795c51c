"""``hf-stability``: the command line (demo, train, analyze, report, push)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import HfStabilityError

COMMANDS = {
    "demo": "Fine-tune the packaged MiniLM on tweet sentiment and run a small butterfly study (offline).",
    "train": "Run a butterfly study of a text classifier: model, data, StabilityArguments and TrainingArguments flags.",
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


def _parser(dataclasses: tuple, command: str):
    from transformers import HfArgumentParser

    return HfArgumentParser(dataclasses, prog=f"hf-stability {command}")


def _print_result(result) -> None:
    print()
    print(result.format_table())
    print()
    print(f"Run directory: {result.run_dir.resolve()}")


def _print_summary(report) -> None:
    from .report.table import summary_table

    print()
    print(summary_table(report))


def _print_report_files(files) -> None:
    print(f"\nModel card: {files.card.resolve()}")
    print(f"Plots:      {files.plots_dir.resolve()} ({', '.join(sorted(files.plots))})")


def _demo(argv: Sequence[str]) -> int:
    from .studies.demo import DemoArguments, analyze_demo, run_demo
    from .studies.recipe import parse_flags

    (demo,) = parse_flags(_parser((DemoArguments,), "demo"), list(argv))
    result = run_demo(demo)
    _print_result(result)
    if demo.analyze:
        report, files = analyze_demo(result.run_dir)
        _print_summary(report)
        _print_report_files(files)
    return 0


def _train(argv: Sequence[str]) -> int:
    from transformers import TrainingArguments

    from .studies.adapters import AdapterArguments
    from .studies.recipe import parse_args
    from .studies.text_classification import TextDataArguments, TextModelArguments, build_text_classification_trainer
    from .training import StabilityArguments

    parser = _parser((TextModelArguments, TextDataArguments, StabilityArguments, TrainingArguments,
                      AdapterArguments), "train")
    _print_result(build_text_classification_trainer(*parse_args(parser, list(argv))).butterfly())
    return 0


def _run_dir_and_rest(command: str, argv: Sequence[str], usage: str) -> tuple[str, list[str]] | None:
    if not argv or argv[0].startswith("-"):
        print(f"usage: hf-stability {command} RUN_DIR {usage}".rstrip(), file=sys.stderr)
        return None
    return argv[0], list(argv[1:])


def _analyze(argv: Sequence[str]) -> int:
    from .analysis import AnalyzeArguments, analyze_run
    from .run_directory import RunDirectory
    from .studies.recipe import parse_flags

    parsed = _run_dir_and_rest("analyze", argv, "[options] (see --help)")
    if parsed is None:
        return 2
    run_dir, rest = parsed
    (args,) = parse_flags(_parser((AnalyzeArguments,), "analyze"), rest)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=args.cpu)
    try:
        report = analyze_run(run_dir, args, accelerator)
    finally:
        accelerator.end_training()
    if accelerator.is_main_process:
        _print_summary(report)
        print(f"\nReport: {RunDirectory(run_dir).report_file.resolve()}")
    return 0


def _report(argv: Sequence[str]) -> int:
    from .report import write_report

    parsed = _run_dir_and_rest("report", argv, "")
    if parsed is None:
        return 2
    run_dir, rest = parsed
    if rest:
        print(f"hf-stability report: error: unrecognized arguments: {' '.join(rest)}", file=sys.stderr)
        return 2
    _print_report_files(write_report(run_dir))
    return 0


def _push(argv: Sequence[str]) -> int:
    from .report import push_report
    from .studies.recipe import parse_flags

    parsed = _run_dir_and_rest("push", argv, "--repo-id NAME [--private] [--include-weights] [--commit-message M]")
    if parsed is None:
        return 2
    run_dir, rest = parsed
    (args,) = parse_flags(_parser((PushArguments,), "push"), rest)
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
