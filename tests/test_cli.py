"""The command line and the project's two set-up commands."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hf_stability.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_readme_holds_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- setup-commands -->\s*```bash\n(.*?)```", readme, re.DOTALL)
    assert block, "README.md must keep its set-up commands in the marked block"
    commands = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    demo, tests = commands
    assert "hf-stability demo" in demo and "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_usage_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "train" in out
    assert main(["fly"]) == 2


def test_demo_runs_end_to_end_and_prints_the_table(tmp_path):
    command = [
        sys.executable, "-m", "hf_stability.cli", "demo", "--output_dir", str(tmp_path / "demo"),
        "--max_steps", "3", "--spawn_steps", "0", "1", "--num_children", "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "final L2 to parent" in out and "amplification" in out and "eval_accuracy" in out
    assert re.search(r"^\s+0\s+c0 \(control\)\s+0\s+n/a\s+0\.\d+", out, re.MULTILINE)
    assert re.search(r"^\s+1\s+c1 \(gaussian 0\.01\)\s+[0-9.e-]+\s+[0-9.e+-]+x\s+0\.\d+", out, re.MULTILINE)
    assert f"Run directory: {tmp_path / 'demo'}" in out
    assert "children: 100%" in result.stderr  # tqdm progress
    # it ends with the analysis and the report
    assert "loss barrier" in out and "L2 aligned" in out
    # on a CPU the floor is 0, so a child that moved is never counted at the floor
    assert "at the floor" in out and re.search(r"^\s+1\s+children\s.*\s0 of 1$", out, re.MULTILINE)
    card = tmp_path / "demo" / "analysis" / "README.md"
    assert f"Model card: {card}" in out and card.is_file()
    assert "barrier_vs_spawn_step.png" in out and (card.parent / "plots" / "barrier_vs_spawn_step.png").is_file()


def test_user_errors_exit_with_a_message_not_a_traceback(tmp_path):
    command = [
        sys.executable, "-m", "hf_stability.cli", "demo", "--output_dir", str(tmp_path / "d"),
        "--max_steps", "3", "--spawn_steps", "5",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert "error: Spawn steps [5] are at or beyond the last training step (3)" in result.stderr
    assert "Traceback" not in result.stderr


def test_recipe_config_parses_into_the_three_argument_dataclasses():
    from transformers import HfArgumentParser, TrainingArguments

    from hf_stability import StabilityArguments
    from hf_stability.studies.recipe import RecipeAnalysisArguments
    from hf_stability.studies.text_classification import TextDataArguments, TextModelArguments

    parser = HfArgumentParser((TextModelArguments, TextDataArguments, StabilityArguments, RecipeAnalysisArguments,
                               TrainingArguments))
    _, data, stability, _, training = parser.parse_json_file(str(ROOT / "recipes" / "configs" / "minilm_tweets.json"))
    assert data.dataset == "tweets" and stability.spawn_steps == [0, 25, 100, 250]
    assert max(stability.spawn_steps) < training.max_steps


@pytest.mark.parametrize("command, unknown", [
    (["analyze", "RUN", "--alphas", "3", "--frobnicate", "1"], "--frobnicate 1"),
    (["push", "RUN", "--repo-id", "me/x", "--bogus"], "--bogus"),
    (["train", "--output_dir", "RUN", "--frobnicate", "1"], "--frobnicate 1"),
    (["demo", "--output_dir", "RUN", "--sizes", "small"], "--sizes small"),
])
def test_an_unknown_flag_is_a_usage_error_not_a_traceback(tmp_path, capsys, command, unknown):
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path / "run") if word == "RUN" else word for word in command])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"hf-stability {command[0]}: error: unrecognized arguments: {unknown}" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, name, message", [
    ("--dataset", "no_such_dataset_here", "Cannot load the dataset 'no_such_dataset_here': it is no local folder"),
    ("--model_name_or_path", "/no/such/model", "Cannot load the tokenizer '/no/such/model': it is no local folder"),
])
def test_a_dataset_or_model_that_cannot_be_found_is_named_with_what_to_pass(tmp_path, capsys, flag, name, message):
    assert main(["train", "--output_dir", str(tmp_path / "run"), flag, name, "--use_cpu", "true"]) == 1
    err = capsys.readouterr().err
    assert message in err and ("'minilm'" in err or "tweets and drug_reviews work offline" in err)
    assert "Traceback" not in err
