"""Faults and bad input that a study must survive or refuse clearly (docs/reliability.md). Killed
and resumed studies, a second writer and a full disk are in test_trainer.py; NaN children, bad
perturbation arguments and patterns that match nothing in test_trainer.py and test_perturb.py;
other architectures, corrupt weights and unlabelled data in test_analysis.py; links planted for
a push in test_report.py."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from helpers import copy_run, study_trainer

from hf_stability import StabilityArguments
from hf_stability.analysis import AnalyzeArguments, analyze_run
from hf_stability.errors import HfStabilityError, NoMatchingParametersError, RunDirectoryError
from hf_stability.report import write_report
from hf_stability.run_directory import RunDirectory
from hf_stability.studies.text_classification import TextDataArguments, TextModelArguments, _card_metadata

PACKAGE = Path(__file__).resolve().parents[1] / "hf_stability"
def test_a_run_directory_of_another_format_version_is_refused_with_what_to_do(analysed_study, tmp_path):
    run = copy_run(analysed_study, tmp_path)
    config_file = run / "stability_config.json"
    config = json.loads(config_file.read_text())
    config["format_version"] = 99
    config_file.write_text(json.dumps(config))
    message = r"format version 99, this hf_stability reads version 1"
    with pytest.raises(RunDirectoryError, match=message + r".*overwrite_run=True \(--overwrite_run\)"):
        study_trainer(run).butterfly()
    with pytest.raises(RunDirectoryError, match=message):
        analyze_run(run, AnalyzeArguments(cpu=True, reanalyze=True))
    assert json.loads(config_file.read_text())["format_version"] == 99  # refused, not rewritten


def test_a_spawn_checkpoint_without_its_rng_state_is_refused_naming_the_file(analysed_study, tmp_path):
    run = copy_run(analysed_study, tmp_path)
    directory = RunDirectory(run)
    shutil.rmtree(directory.child_dir(4, 1))  # child 1 of step 4 still has to train
    rng = directory.parent_checkpoint(4) / "rng_state.pth"
    assert rng.is_file()
    rng.unlink()
    remedy = r"overwrite_run=True \(--overwrite_run\)"
    with pytest.raises(RunDirectoryError, match=r"checkpoint-4 .*no RNG state \(rng_state\.pth\).*" + remedy):
        study_trainer(run).butterfly()
    assert not directory.child_final(4, 1).exists()


def _calls(tree: ast.AST, dotted: str) -> list[ast.Call]:
    def name(node: ast.AST) -> str:
        if isinstance(node, ast.Attribute):
            return f"{name(node.value)}.{node.attr}"
        return node.id if isinstance(node, ast.Name) else ""

    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and name(n.func) == dotted]


def test_nothing_is_unpickled_and_final_models_hold_no_pickle(analysed_study):
    for source in PACKAGE.rglob("*.py"):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for call in _calls(tree, "torch.load"):
            safe = [k for k in call.keywords if k.arg == "weights_only" and isinstance(k.value, ast.Constant)]
            assert safe and safe[0].value.value is True, f"{source}:{call.lineno}: torch.load without weights_only=True"
        for unsafe in ("pickle.load", "pickle.loads", "dill.load", "dill.loads", "joblib.load"):
            assert not _calls(tree, unsafe), f"{source} calls {unsafe}"
    finals = [analysed_study / "parent" / "final", *analysed_study.glob("children/t*/c*/final")]
    assert len(finals) == 7
    for final in finals:
        names = {p.name for p in final.iterdir()}
        assert "model.safetensors" in names
        assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))], final


def test_reports_and_cards_name_no_local_path(analysed_study):
    home = os.path.expanduser("~")
    for name in ("report.json", "README.md"):
        text = (analysed_study / "analysis" / name).read_text()
        assert str(analysed_study) not in text and str(analysed_study.parent) not in text, name
        assert not re.search(r"(^|[\s\"'(=])(/tmp/|/home/|/root/|/Users/|[A-Za-z]:\\)", text), name
        assert home == "/" or home not in text, name
    # a local model or dataset path never becomes the card's base_model or dataset name
    metadata = _card_metadata(TextModelArguments(model_name_or_path=str(analysed_study / "parent" / "final")),
                              TextDataArguments(dataset=str(analysed_study / "data")), StabilityArguments())
    assert metadata.base_model is None and metadata.dataset_name is None


# ---- a killed run's leftovers -----------------------------------------------------------------

def test_a_killed_runs_temporaries_are_removed_when_the_study_runs_again(analysed_study, tmp_path):
    run = copy_run(analysed_study, tmp_path)
    planted = [run / "parent" / ".final.tmp", run / "children" / "t4" / "c1" / ".final.tmp",
               run / "children" / "t0" / ".stacked-0-1.tmp", run / ".push-abc123.tmp"]
    for folder in planted:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    (run / ".stability_config.json.x1y2.tmp").write_text("{")
    (run / "analysis" / ".report.json.z9.tmp").write_text("{")
    study_trainer(run).butterfly()
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


# ---- crafted or shared run directories ---------------------------------------------------------

def test_analyze_never_runs_code_found_in_a_run_directory(analysed_study, tmp_path):
    run = copy_run(analysed_study, tmp_path)
    final = run / "parent" / "final"
    marker = tmp_path / "code-ran"
    (final / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((final / "config.json").read_text())
    config["architectures"] = ["AutoModelForSequenceClassification"]
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    (final / "config.json").write_text(json.dumps(config))
    (final / "manifest.json").unlink()  # whoever crafted the run need not leave a manifest to betray it
    message = r"names the architecture 'AutoModelForSequenceClassification' and an auto_map .* never runs code"
    with pytest.raises(RunDirectoryError, match=message):
        analyze_run(run, AnalyzeArguments(train_samples=0, cpu=True, reanalyze=True))
    config["architectures"] = ["EvilModel"]
    (final / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunDirectoryError, match=r"'EvilModel'.*model_class=YourModelClass"):
        analyze_run(run, AnalyzeArguments(train_samples=0, cpu=True, reanalyze=True))
    assert not marker.exists()


@pytest.mark.parametrize("command", ["analyze", "report"])
def test_analysis_and_report_never_write_through_a_link_out_of_the_run(analysed_study, tmp_path, command):
    run = copy_run(analysed_study, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run / "analysis", elsewhere)
    (elsewhere / "README.md").write_text("someone else's file\n")
    (run / "analysis").symlink_to(elsewhere, target_is_directory=True)
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir() if p.is_file()}
    with pytest.raises(RunDirectoryError, match=r"analysis is a symbolic link .* writes only inside the run"):
        if command == "analyze":
            analyze_run(run, AnalyzeArguments(train_samples=0, cpu=True, reanalyze=True))
        else:
            write_report(run)
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("field, value", [("spawn_steps", ["5/../../x"]), ("children", [0, "1"]),
                                          ("max_steps", "6"), ("spawn_steps", [0, 9])])
def test_a_damaged_stability_config_field_is_refused_naming_it(analysed_study, tmp_path, field, value):
    run = copy_run(analysed_study, tmp_path)
    config_file = run / "stability_config.json"
    config = json.loads(config_file.read_text())
    config[field] = value
    config_file.write_text(json.dumps(config))
    with pytest.raises(RunDirectoryError, match=rf"the field '{field}' holds .* edited or damaged"):
        analyze_run(run, AnalyzeArguments(train_samples=0, cpu=True, reanalyze=True))
    assert not (tmp_path / "x").exists()
    # the study run again with its own arguments rewrites the file (test_corruption.py checks the rest)
    study_trainer(run).butterfly()
    assert json.loads(config_file.read_text())[field] != value


# ---- checks before anything trains ---------------------------------------------------------------

def _untouched(folder: Path) -> bool:
    """Nothing of a study was written (the Trainer itself may create an empty output_dir)."""
    return not folder.exists() or not any(folder.iterdir())


def _trainer_with(out, train=None, model_init=None, **stability):
    from helpers import tiny_bert, training_args, tweets

    from hf_stability import StabilityTrainer

    return StabilityTrainer(model_init=model_init or (lambda: tiny_bert(0)), args=training_args(out, max_steps=4),
                            train_dataset=train if train is not None else tweets()[0],
                            stability_args=StabilityArguments(spawn_steps=[0], num_children=1, **stability))


def test_more_entries_than_the_perturbation_selects_is_refused_before_training(tmp_path):
    with pytest.raises(NoMatchingParametersError, match=r"perturbation_num_entries=100 is larger than the 99 entries"):
        _trainer_with(tmp_path / "run", perturbation_include=[r"classifier\.(weight|bias)$"],
                      perturbation_num_entries=100).butterfly()
    assert _untouched(tmp_path / "run")


@pytest.mark.parametrize("labels", ["strings", "missing"])
def test_labels_the_model_cannot_take_are_refused_before_training(tmp_path, labels):
    from datasets import Dataset
    from helpers import tweets

    train = tweets()[0]
    columns = {c: train[c] for c in train.column_names if c != "label"}
    if labels == "strings":
        columns["label"] = [["negative", "neutral", "positive"][y] for y in train["label"]]
        message = r"data collator cannot batch the first training examples .* labels must be numbers"
    else:
        message = r"model computes no training loss from the first batch .* needs a 'labels' or 'label' column"
    with pytest.raises(HfStabilityError, match=message):
        _trainer_with(tmp_path / "run", train=Dataset.from_dict(columns)).butterfly()
    assert _untouched(tmp_path / "run")


def test_models_the_analyzer_could_not_load_are_refused_before_training(tmp_path):
    from helpers import tiny_bert
    from torch import nn

    class Plain(nn.Module):  # what a Trainer trains, but saves no config.json
        def __init__(self):
            super().__init__()
            self.inner = tiny_bert(0)

        def forward(self, **inputs):
            return self.inner(**inputs)

    with pytest.raises(HfStabilityError, match=r"needs a transformers PreTrainedModel.* a Plain saves no config\.json"):
        _trainer_with(tmp_path / "plain", model_init=Plain).butterfly()
    assert _untouched(tmp_path / "plain")
