"""The report stage: plots and card from report.json, the push to a Hub-compatible server on
127.0.0.1 (real HTTP, huggingface_hub's own client), and clear errors for bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import copy_run, study_trainer
from hub_server import HubServer
from huggingface_hub import ModelCard
from PIL import Image

from hf_stability.errors import PushError, ReportError
from hf_stability.report import load_report, push_report, spawn_findings, write_report
from hf_stability.run_directory import LOCK_NAME

TOKEN = "hf_testTOKEN_5f1d2c9a0b7e"


def _digests(folder: Path) -> dict[str, str]:
    """Every file's sha256 but the run's lock file (which notes who holds the run)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def test_report_renders_every_plot_and_a_card_built_from_the_numbers(analysed_study):
    run = analysed_study
    plots = sorted(p.name for p in (run / "analysis" / "plots").glob("*.png"))
    assert plots == ["aligned_vs_unaligned.png", "amplification_vs_spawn_step.png", "barrier_vs_spawn_step.png",
                     "cka_per_layer.png", "divergence.png", "divergence_normalized.png", "metric_along_alpha.png"]
    for name in plots:
        with Image.open(run / "analysis" / "plots" / name) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 300
    card = ModelCard.load(run / "analysis" / "README.md")
    assert card.data.library_name == "hf_stability"
    assert card.data.base_model == "google-bert/bert-base-uncased"
    assert card.data.datasets == ["cardiffnlp/tweet_eval"]
    assert "hf-stability" in card.data.tags and card.data.pipeline_tag == "text-classification"
    report = load_report(run)
    accuracy = card.data.eval_results[0]
    assert accuracy.metric_value == pytest.approx(1 - report.parent["eval"].error, abs=1e-6)
    text = card.text
    assert "Gaussian noise of sigma = 0.5 x each tensor's init std, at steps 0 and 4 of 8" in text
    for finding in spawn_findings(report):
        assert f"children spawned at step {finding.spawn_step}" in text
    control = report.summary[0].control
    assert f"| 0 | control (noise floor) | {control['l2']:.4g} |" in text
    for name in plots:
        assert f"(plots/{name})" in text
    assert str(run) not in text  # no local paths in what gets published
    # every perturbed child beside its control, with its amplification; on a CPU the floor is 0
    assert "## Children against the noise floor" in text
    for pair in (p for p in report.parent_child() if not p.is_control):
        barrier = pair.barriers["eval"]["loss"].barrier
        row = f"| {pair.spawn_step} | {pair.child} | {pair.l2.l2:.4g} (0) | {barrier:.4g} ("
        assert row in text and f"| {pair.amplification:.4g} | beyond the floor |" in text


def test_a_layer_whose_features_do_not_vary_is_n_a_never_nan(analysed_study):
    """BERT's CLS embedding (before the first layer) is the same for every example: its CKA is
    undefined, stored as null, left out of the means, and no NaN reaches report.json."""
    import math

    text = (analysed_study / "analysis" / "report.json").read_text()

    def no_constants(name):
        raise AssertionError(f"report.json holds {name}")

    json.loads(text, parse_constant=no_constants)  # NaN and Infinity are not JSON
    report = load_report(analysed_study)
    for pair in report.parent_child():
        assert pair.cka.layers[0] == "embeddings" and pair.cka.values[0] is None
        assert all(v is not None for v in pair.cka.values[1:])
    for row in report.summary:
        assert math.isfinite(row.children["cka_mean"].mean)


def test_a_child_within_twice_its_floor_is_marked_indistinguishable_in_the_card(analysed_study, tmp_path):
    run = copy_run(analysed_study, tmp_path)
    path = run / "analysis" / "report.json"
    report = json.loads(path.read_text())
    child = next(p for p in report["pairs"] if p["kind"] == "parent-child" and not p["is_control"])
    # as if the hardware alone had moved the control as far as the child
    child["noise_floor"]["figures"]["l2"].update(floor=child["l2"]["l2"], within=True)
    for key in ("loss_barrier_eval", "error_barrier_eval"):
        child["noise_floor"]["figures"][key]["within"] = True
    child["noise_floor"]["indistinguishable"] = True
    path.write_text(json.dumps(report))
    write_report(run)
    text = (run / "analysis" / "README.md").read_text()
    assert f"| {child['spawn_step']} | {child['child']} | {child['l2']['l2']:.4g} ({child['l2']['l2']:.4g}) |" in text
    assert text.count("| indistinguishable from the noise floor |") == 1


def test_a_separated_spawn_step_is_called_another_basin(analysed_study, tmp_path):
    run = copy_run(analysed_study, tmp_path)
    path = run / "analysis" / "report.json"
    report = json.loads(path.read_text())
    row = report["summary"][0]
    row["children"]["loss_barrier_eval"] = {"mean": 0.41, "std": 0.05, "n": 2}
    row["control"]["loss_barrier_eval"] = 0.0
    path.write_text(json.dumps(report))
    write_report(run)
    text = (run / "analysis" / "README.md").read_text()
    assert ("children spawned at step 0 end in another basin: loss barrier 0.41 +- 0.05 against a noise floor of 0"
            in text)


def test_push_uploads_byte_identical_files_with_the_token_and_never_writes_it(analysed_study, tmp_path):
    run = copy_run(analysed_study, tmp_path)
    before = _digests(run)
    with HubServer() as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
                   HF_HOME=str(tmp_path / "hf_home"))
        result = subprocess.run(
            [sys.executable, "-m", "hf_stability.cli", "push", str(run), "--repo-id", "someone/stability-study",
             "--private", "--include-weights"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        files = hub.repos["someone/stability-study"]
    assert hub.created[0]["visibility"] == "private" or hub.created[0].get("private") is True
    analysis = run / "analysis"
    expected = {"README.md": analysis / "README.md", "report.json": analysis / "report.json"}
    expected |= {f"plots/{p.name}": p for p in (analysis / "plots").glob("*.png")}
    expected |= {f.name: f for f in (run / "parent" / "final").iterdir() if f.is_file()}
    expected |= {f"children/{w.parent.parent.parent.name}/{w.parent.parent.name}/model.safetensors": w
                 for w in run.glob("children/t*/c*/final/model.safetensors")}
    assert set(files) == set(expected)
    for name, path in expected.items():
        assert files[name] == path.read_bytes(), name
    assert any(name.endswith(".safetensors") for name in files) and len(hub.lfs) >= 6  # large files went by LFS
    # every call of the Hub's API carries the token (LFS content goes to the upload URL the batch
    # answer gave, as with the real Hub's pre-signed URLs)
    api = [r for r in hub.requests if "/api/repos/" in r["path"] or "/api/models/" in r["path"] or ".git/" in r["path"]]
    assert {r["path"].split("/")[2] for r in api if r["path"].startswith("/api/")} == {"repos", "models"}
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in api)
    # the token is nowhere in the output or the run directory, and the run is unchanged
    assert TOKEN not in result.stdout + result.stderr
    assert "Pushed: " in result.stdout
    assert _digests(run) == before
    for path in tmp_path.rglob("*"):  # the run directory, HF_HOME and anything else the push wrote
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("status, message", [(401, "the token was refused"), (500, "the Hub failed on its side")])
def test_a_refusing_hub_gives_a_clear_error_and_leaves_the_report_untouched(analysed_study, tmp_path, status, message):
    run = copy_run(analysed_study, tmp_path)
    before = _digests(run)
    with HubServer() as hub:
        hub.fail_with = status
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
                   HF_HOME=str(tmp_path / "hf_home"))
        result = subprocess.run([sys.executable, "-m", "hf_stability.cli", "push", str(run), "--repo_id", "me/study"],
                                env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert f"HTTP {status}" in result.stderr and message in result.stderr
    assert "Nothing local was changed" in result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert _digests(run) == before and not list(run.glob(".push-*"))


@pytest.mark.parametrize("planted", ["plots/divergence.png", "final/config.json", "plots/"])
def test_push_uploads_no_link_planted_in_the_run_directory(analysed_study, tmp_path, monkeypatch, planted):
    """A downloaded run may hold links: to the user's token file, or a folder elsewhere. Push
    refuses them before any request instead of uploading their targets."""
    run = copy_run(analysed_study, tmp_path)
    secret = tmp_path / "hf_home" / "token"
    secret.parent.mkdir()
    secret.write_text(TOKEN)
    if planted == "plots/":  # a linked folder on the way to the figures
        outside = tmp_path / "elsewhere"
        shutil.move(run / "analysis" / "plots", outside)
        (run / "analysis" / "plots").symlink_to(outside, target_is_directory=True)
        message = r"plots/\w+\.png lies outside .* once links are followed"
    else:
        target = run / "analysis" / planted if planted.startswith("plots") else run / "parent" / planted
        target.unlink()
        target.symlink_to(secret)
        message = rf"{target.name} is a symbolic link \(to {secret}\): push uploads only the regular files"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with HubServer() as hub:
        with pytest.raises(PushError, match=message):
            push_report(run, "me/study", include_weights=True, endpoint=hub.url)
    assert hub.requests == [] and hub.repos == {}
    assert not list(run.glob(".push-*"))


def test_invalid_repo_id_or_missing_token_is_refused_before_any_request(analysed_study, monkeypatch):
    run = analysed_study
    with HubServer() as hub:
        with pytest.raises(PushError, match="Invalid repo id 'a/b/c'"):
            push_report(run, "a/b/c", endpoint=hub.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HOME", str(run.parent / "empty_hf_home"))
        with pytest.raises(PushError, match="No Hugging Face token"):
            push_report(run, "me/study", endpoint=hub.url)
    assert hub.requests == []


def test_bad_reports_give_errors_that_say_what_to_run(analysed_study, tmp_path):
    run = copy_run(analysed_study, tmp_path)
    path = run / "analysis" / "report.json"
    good = json.loads(path.read_text())
    path.write_text(json.dumps({**good, "schema_version": 99}))
    with pytest.raises(ReportError, match="schema version 99, newer than this hf_stability reads"):
        write_report(run)
    broken = dict(good)
    del broken["divergence"]
    path.write_text(json.dumps(broken))
    with pytest.raises(ReportError, match="lacks the field 'divergence'.*reanalyze=True"):
        write_report(run)
    edited = json.loads(json.dumps(good))
    edited["pairs"][1]["l2"]["l2"] = "far"
    path.write_text(json.dumps(edited))
    remedy = r"reanalyze=True \(--reanalyze\)"
    with pytest.raises(ReportError, match=r"the field 'pairs\.1\.l2\.l2' holds 'far', not a number.*" + remedy):
        write_report(run)
    del good["run"]["spawn_steps"]
    path.write_text(json.dumps(good))
    with pytest.raises(ReportError, match="lacks the field 'run.spawn_steps'"):
        write_report(run)
    shutil.rmtree(run / "analysis")
    result = subprocess.run([sys.executable, "-m", "hf_stability.cli", "report", str(run)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "has no analysis/report.json: run `hf-stability analyze" in result.stderr
    with pytest.raises(PushError, match="has no rendered report: run `hf-stability report"):
        push_report(run, "me/study")


def test_stability_trainer_model_card_gets_the_stability_section(analysed_study, tmp_path):
    run = copy_run(analysed_study, tmp_path)
    trainer = study_trainer(run)  # the study's trainer (push_to_hub writes this card)
    trainer.create_model_card(license="apache-2.0", model_name="tiny-study")
    card = ModelCard.load(run / "README.md")
    assert "## Training stability (hf_stability)" in card.text
    assert "children spawned at step 0" in card.text and "(analysis/plots/barrier_vs_spawn_step.png)" in card.text
    assert "hf-stability" in card.data.tags and card.data.license == "apache-2.0"
