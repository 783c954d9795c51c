"""Faults and bad input that a study must survive or refuse clearly (docs/reliability.md). Killed
and resumed studies and a full disk are in test_trainer.py; NaN children, bad perturbation
arguments and patterns that match nothing in test_trainer.py and test_perturb.py; other
architectures, corrupt weights and unlabelled data in test_analysis.py."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from helpers import tiny_trainer

from hf_stability import StabilityArguments
from hf_stability.analysis import AnalyzeArguments, analyze_run
from hf_stability.errors import RunDirectoryError
from hf_stability.report import write_report
from hf_stability.run_directory import RunDirectory
from hf_stability.tasks import TextClassificationArguments
from hf_stability.tasks.text_classification import _card_metadata

PACKAGE = Path(__file__).resolve().parents[1] / "hf_stability"
STUDY = dict(spawn_steps=[0, 3], num_children=1, perturbation_scale=0.5, divergence_every=3)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    tiny_trainer(out, StabilityArguments(**STUDY), max_steps=6, save_strategy="steps", save_steps=3).butterfly()
    analyze_run(out, AnalyzeArguments(train_samples=16, batch_size=16, alphas=3, cpu=True))
    write_report(out)
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def test_a_run_directory_of_another_format_version_is_refused_with_what_to_do(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    config_file = run / "stability_config.json"
    config = json.loads(config_file.read_text())
    config["format_version"] = 99
    config_file.write_text(json.dumps(config))
    message = r"format version 99, this hf_stability reads version 1"
    with pytest.raises(RunDirectoryError, match=message + r".*--overwrite_run"):
        tiny_trainer(run, StabilityArguments(**STUDY), max_steps=6).butterfly()
    with pytest.raises(RunDirectoryError, match=message):
        analyze_run(run, AnalyzeArguments(cpu=True, reanalyze=True))
    assert json.loads(config_file.read_text())["format_version"] == 99  # refused, not rewritten


def test_a_spawn_checkpoint_without_its_rng_state_is_refused_naming_the_file(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    directory = RunDirectory(run)
    shutil.rmtree(directory.child_dir(3, 1))  # child 1 of step 3 still has to train
    rng = directory.parent_checkpoint(3) / "rng_state.pth"
    assert rng.is_file()
    rng.unlink()
    with pytest.raises(RunDirectoryError, match=r"checkpoint-3 .*no RNG state \(rng_state\.pth\).*--overwrite_run"):
        tiny_trainer(run, StabilityArguments(**STUDY), max_steps=6, save_strategy="steps", save_steps=3).butterfly()
    assert not directory.child_final(3, 1).exists()


def _calls(tree: ast.AST, dotted: str) -> list[ast.Call]:
    def name(node: ast.AST) -> str:
        if isinstance(node, ast.Attribute):
            return f"{name(node.value)}.{node.attr}"
        return node.id if isinstance(node, ast.Name) else ""

    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and name(n.func) == dotted]


def test_nothing_is_unpickled_and_final_models_hold_no_pickle(finished_run):
    for source in PACKAGE.rglob("*.py"):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for call in _calls(tree, "torch.load"):
            safe = [k for k in call.keywords if k.arg == "weights_only" and isinstance(k.value, ast.Constant)]
            assert safe and safe[0].value.value is True, f"{source}:{call.lineno}: torch.load without weights_only=True"
        for unsafe in ("pickle.load", "pickle.loads", "dill.load", "dill.loads", "joblib.load"):
            assert not _calls(tree, unsafe), f"{source} calls {unsafe}"
    finals = [finished_run / "parent" / "final", *finished_run.glob("children/t*/c*/final")]
    assert len(finals) == 5
    for final in finals:
        names = {p.name for p in final.iterdir()}
        assert "model.safetensors" in names
        assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))], final


def test_reports_and_cards_name_no_local_path(finished_run):
    home = os.path.expanduser("~")
    for name in ("report.json", "README.md"):
        text = (finished_run / "analysis" / name).read_text()
        assert str(finished_run) not in text and str(finished_run.parent) not in text, name
        assert not re.search(r"(^|[\s\"'(=])(/tmp/|/home/|/root/|/Users/|[A-Za-z]:\\)", text), name
        assert home == "/" or home not in text, name
    # a local model or dataset path never becomes the card's base_model or dataset name
    local = TextClassificationArguments(model_name_or_path=str(finished_run / "parent" / "final"),
                                        dataset=str(finished_run / "data"))
    metadata = _card_metadata(local, StabilityArguments())
    assert metadata.base_model is None and metadata.dataset_name is None
