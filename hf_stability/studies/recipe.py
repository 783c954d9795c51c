"""What every recipe shares: its arguments from a config file and flags, and after training the
analysis and the report.

``RecipeAnalysisArguments`` holds the analyzer options a recipe exposes; its field names do not
clash with TrainingArguments, so one HfArgumentParser parses both.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..analysis.arguments import AlignmentMethod, Autocast, Pairs
from ..errors import StudyArgumentsError

logger = logging.getLogger(__name__)


@dataclass
class RecipeAnalysisArguments:
    """Analysis and report at the end of a recipe (``hf-stability analyze`` has them all)."""

    analyze: bool = field(default=True, metadata={"help": "Analyze the run and write its report when training ends."})
    alignment: AlignmentMethod = field(default=AlignmentMethod.WEIGHT, metadata={"help": "Permutation alignment."})
    pairs: Pairs = field(default=Pairs.PARENT_CHILD, metadata={"help": "Pairs to measure."})
    alphas: int = field(default=11, metadata={"help": "Interpolation points in [0, 1] for the barriers."})
    analysis_eval_batch_size: int = field(default=256, metadata={"help": "Batch size of the analyzer."})
    analysis_train_subset: int = field(default=512, metadata={"help": "Train examples for train-set barriers."})
    analysis_autocast: Autocast = field(default=Autocast.NONE, metadata={"help": "Analyzer autocast."})
    reanalyze: bool = field(
        default=False,
        metadata={"help": "Measure again even when RUN/analysis/report.json already holds this analysis."},
    )


def analyze_and_report(run_dir: str | Path, args: RecipeAnalysisArguments, accelerator: Any = None) -> Any:
    """Analyze ``run_dir`` on every process (``accelerator`` splits the work) and render the
    report on the main one. Returns the report (None when ``args.analyze`` is off)."""
    if not args.analyze:
        return None
    from ..analysis import AnalyzeArguments, analyze_run
    from ..report import write_report

    analyze_args = AnalyzeArguments(
        pairs=args.pairs, alphas=args.alphas, batch_size=args.analysis_eval_batch_size,
        train_samples=args.analysis_train_subset, autocast=args.analysis_autocast, alignment=args.alignment,
        reanalyze=args.reanalyze,
    )
    report = analyze_run(run_dir, analyze_args, accelerator)
    if accelerator is None or accelerator.is_main_process:
        files = write_report(run_dir)
        logger.info("Report: %s (plots: %s)", files.card, ", ".join(sorted(files.plots)))
    return report


def setup_logging(training: Any) -> None:
    """Log at INFO on the process that logs (TrainingArguments.should_log), WARNING elsewhere."""
    logging.basicConfig(level=logging.INFO if training.should_log else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_study(trainer: Any, args: RecipeAnalysisArguments) -> Any:
    """A recipe's study: ``trainer.butterfly()``, its table in the log, then analysis and report.
    Returns the ButterflyResult."""
    result = trainer.butterfly()
    if trainer.is_world_process_zero():
        logger.info("Butterfly study finished:\n%s", result.format_table())
    analyze_and_report(result.run_dir, args, trainer.accelerator)
    return result


def parse_flags(parser: Any, argv: list[str]) -> tuple[Any, ...]:
    """``parser.parse_args_into_dataclasses(argv)``, with a flag that is no option of the parser
    reported as argparse reports any usage error (the usage line, the bad flags, exit code 2)
    instead of HfArgumentParser's ValueError traceback."""
    *parsed, remaining = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)} (see --help)")
    return tuple(parsed)


def parse_args(parser: Any, argv: list[str] | None = None) -> tuple[Any, ...]:
    """The dataclasses of ``parser`` (an HfArgumentParser) from a JSON or YAML config file, from
    command-line flags, or from both: ``recipe.py config.json --output_dir runs/x`` reads the file
    and lets the flags after it override its values."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].endswith((".json", ".yaml", ".yml")):
        return parse_flags(parser, argv)
    config_file, overrides = Path(argv[0]), argv[1:]
    if not config_file.is_file():
        raise StudyArgumentsError(f"Config file {config_file} does not exist: give the path of a JSON or YAML file.")
    import yaml

    try:
        text = config_file.read_text(encoding="utf-8")
        values = json.loads(text) if config_file.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise StudyArgumentsError(f"Config file {config_file} cannot be read ({err}): fix its syntax.") from None
    if not isinstance(values, dict):
        raise StudyArgumentsError(f"Config file {config_file} must hold a mapping of option names to values.")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise StudyArgumentsError(f"{config_file} has keys that are no option of this recipe: {unknown} (see --help).")
    if not overrides:
        return parser.parse_dict(values)
    parser.set_defaults(**values)
    return parse_flags(parser, overrides)
