"""A damaged run directory never becomes wrong numbers (docs/reliability.md, "Damaged run
directories"): every file a study wrote is checked against the checksums its run recorded, every
record is read strictly, and each message names the narrowest remedy, which works."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import copy_run, study_analysis, study_trainer

from hf_stability.analysis import analyze_run
from hf_stability.analysis.schema import REPORT_SCHEMA_VERSION
from hf_stability.errors import ReportError, RunDirectoryError
from hf_stability.report import write_report

ANALYSIS = study_analysis()  # the arguments the shared study's report was made with
CHILD = "children/t4/c1"
CHILD0 = "children/t0/c1"  # its record has five lines (steps 0, 2, 4, 6, 8)
CHILD_REMEDY = (rf"Delete .*{CHILD} and run the study again: it trains that child alone again from the parent's "
                r"checkpoint-4")
PARENT_REMEDY = r"Restore .*parent/final from a copy of the run"
CHILD0_REMEDY = rf"Delete .*{CHILD0} and run the study again"
DAMAGED = r"(does not match the checksum its run recorded|has \d+ bytes, \d+ were written)"
DATA_REMEDY = r"The saved data of .*data is damaged: restore that folder .* eval_data="
CONFIG_REMEDY = r"Run the study again with the arguments its models were trained with"


@pytest.fixture
def run(analysed_study, tmp_path):
    return copy_run(analysed_study, tmp_path)


@pytest.fixture(scope="module")
def analysed(analysed_study):
    from hf_stability.report import load_report

    return analysed_study, load_report(analysed_study)


def _flip(path: Path, count: int = 100) -> None:
    """Flip ``count`` bytes in the middle of a file (a safetensors header stays intact)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(middle + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _drop_manifests(run: Path) -> None:
    """As a run of an earlier version, which recorded no checksums."""
    for manifest in run.rglob("manifest.json"):
        manifest.unlink()


CASES = {
    # name: (file, how, error that names it, remedy)
    "child weights, 100 bytes flipped": (f"{CHILD}/final/model.safetensors", "flip",
                                         r"model\.safetensors does not match the checksum its run recorded",
                                         CHILD_REMEDY),
    "child weights truncated": (f"{CHILD}/final/model.safetensors", "truncate",
                                r"model\.safetensors has 1000 bytes, \d+ were written", CHILD_REMEDY),
    "child config": (f"{CHILD}/final/config.json", "garbage", r"config\.json " + DAMAGED, CHILD_REMEDY),
    "child eval results": (f"{CHILD}/final/eval_results.json", "garbage", r"eval_results\.json " + DAMAGED,
                           CHILD_REMEDY),
    "perturbation record": (f"{CHILD}/perturbation.json", "garbage", r"perturbation\.json " + DAMAGED, CHILD_REMEDY),
    "divergence record, a bad line": (f"{CHILD}/divergence.jsonl", "bad line", r"divergence\.jsonl " + DAMAGED,
                                      CHILD_REMEDY),
    "child manifest": (f"{CHILD}/final/manifest.json", "garbage", r"manifest\.json is not valid JSON", CHILD_REMEDY),
    "parent weights, 100 bytes flipped": ("parent/final/model.safetensors", "flip",
                                          r"parent/final/model\.safetensors does not match the checksum",
                                          PARENT_REMEDY),
    "saved eval data": ("data/eval/data-00000-of-00001.arrow", "flip", r"\.arrow does not match the checksum",
                        DATA_REMEDY),
    "saved data state": ("data/eval/state.json", "garbage", r"state\.json " + DAMAGED, DATA_REMEDY),
    "collator record": ("data/collator.json", "garbage", r"collator\.json " + DAMAGED, DATA_REMEDY),
    "config, not JSON": ("stability_config.json", "garbage", r"stability_config\.json is not valid JSON",
                         CONFIG_REMEDY),
    "config, not UTF-8": ("stability_config.json", "latin-1", r"stability_config\.json is not UTF-8", CONFIG_REMEDY),
    "config, a field edited": ("stability_config.json", "edit", r"the field 'spawn_steps' holds '\[0, 2\]', not what "
                               r"the run's fingerprinted identity says", CONFIG_REMEDY),
}


def _damage(path: Path, how: str) -> None:
    if how == "flip":
        _flip(path)
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif how == "garbage":
        path.write_text('{"half": ')
    elif how == "latin-1":
        path.write_bytes(path.read_bytes().replace(b'"', "\u00e9".encode("latin-1"), 1))
    elif how == "bad line":
        lines = path.read_text().splitlines()
        lines.insert(1, "{not json")
        path.write_text("\n".join(lines) + "\n")
    elif how == "edit":
        config = json.loads(path.read_text())
        config["spawn_steps"] = [0, 2]  # the study's are [0, 4]
        path.write_text(json.dumps(config))


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_damage_is_caught_naming_the_file_and_its_remedy_even_where_a_report_exists(run, case):
    """The analysed run has a report.json: a damaged input must not hide behind it."""
    relative, how, error, remedy = CASES[case]
    _damage(run / relative, how)
    with pytest.raises(RunDirectoryError, match=error + r".*" + remedy):
        analyze_run(run, ANALYSIS)


@pytest.mark.parametrize("how, error", [
    ("bad line", r"divergence\.jsonl line 2 is no \{\"step\", \"l2\"\} record"),
    ("torn", r"divergence\.jsonl line 5 is no \{\"step\", \"l2\"\} record"),
    ("repeat", r"divergence\.jsonl line 3 repeats or goes back to step 2 \(after step 2\)"),
])
def test_a_finished_childs_record_is_read_strictly_without_a_manifest(run, how, error):
    _drop_manifests(run)
    path = run / CHILD0 / "divergence.jsonl"
    lines = path.read_text().splitlines()
    if how == "bad line":
        lines.insert(1, "{not json")
        path.write_text("\n".join(lines) + "\n")
    elif how == "torn":
        path.write_text("\n".join(lines)[:-5])  # the last line cut short
    else:
        path.write_text("\n".join(lines[:2] + lines[1:2] + lines[2:]) + "\n")
    with pytest.raises(RunDirectoryError, match=error + r".*" + CHILD0_REMEDY):
        analyze_run(run, ANALYSIS)


def test_swapped_weights_without_a_manifest_are_caught_by_the_l2_the_child_measured_in_training(run):
    _drop_manifests(run)
    shutil.copy(run / "children/t0/c1/final/model.safetensors", run / CHILD / "final" / "model.safetensors")
    with pytest.raises(RunDirectoryError, match=r"the analyzer measures an L2 of .* and the child measured .* during "
                                                r"training: the weights on disk are not the ones that were trained"):
        analyze_run(run, ANALYSIS)


def test_damaged_saved_data_without_a_manifest_is_named(run):
    _drop_manifests(run)
    (run / "data/eval/data-00000-of-00001.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(RunDirectoryError, match=r"data/eval cannot be loaded .*saved data is damaged.*" + DATA_REMEDY):
        analyze_run(run, ANALYSIS)


def test_a_damaged_child_is_retrained_alone_and_the_analysis_comes_back(run, analysed):
    _flip(run / CHILD / "final" / "model.safetensors")
    with pytest.raises(RunDirectoryError, match=CHILD_REMEDY):
        analyze_run(run, ANALYSIS)
    others = {p: p.stat().st_mtime_ns for p in run.glob("children/*/*/final/model.safetensors") if CHILD not in str(p)}
    shutil.rmtree(run / CHILD)  # the remedy, as the message says
    study_trainer(run).butterfly()
    assert {p: p.stat().st_mtime_ns for p in others} == others  # the others were not trained again
    report = analyze_run(run, ANALYSIS)
    # bitwise the child that was damaged: the same figures (its record is shorter, so its pair's inputs differ)
    assert [replace(p, inputs="") for p in report.pairs] == [replace(p, inputs="") for p in analysed[1].pairs]
    # its record skips the steps whose parent snapshot the finished study did not keep; t and the end are there
    steps = json.loads((run / "analysis/report.json").read_text())["divergence"]
    record = next(d for d in steps if (d["spawn_step"], d["child"]) == (4, 1))
    assert record["steps"] == [4, 8]


@pytest.mark.parametrize("how", ["garbage", "edit"])
def test_a_damaged_config_of_intact_models_is_rebuilt_by_running_the_study_again(run, analysed, how):
    _damage(run / "stability_config.json", how)
    with pytest.raises(RunDirectoryError, match=CONFIG_REMEDY):
        analyze_run(run, ANALYSIS)
    before = {p: p.stat().st_mtime_ns for p in run.glob("**/final/model.safetensors")}
    study_trainer(run).butterfly()  # the same arguments: the config is written again, nothing is trained
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert analyze_run(run, ANALYSIS).pairs == analysed[1].pairs
    # other arguments than the models were trained with: not rebuilt, the message says why
    _damage(run / "stability_config.json", how)
    other = study_trainer(run, perturbation_scale=0.25)
    with pytest.raises(RunDirectoryError, match=r"is damaged .* no manifest of the run records these arguments"):
        other.butterfly()


def test_damaged_spawn_checkpoints_no_longer_needed_do_not_stop_a_finished_study(run, analysed):
    _flip(run / "parent/checkpoint-4/optimizer.pt")
    assert analyze_run(run, ANALYSIS).pairs == analysed[1].pairs
    study_trainer(run).butterfly()  # nothing left to train: the damaged checkpoint is not needed
    shutil.rmtree(run / CHILD)  # now a child of step 3 must train again: refused, naming the checkpoint
    with pytest.raises(RunDirectoryError, match=r"checkpoint-4/optimizer\.pt does not match the checksum .* children "
                                                r"of spawn step 4 that are still to train start from it"):
        study_trainer(run).butterfly()
    assert not (run / CHILD / "final").exists()


def test_an_unreadable_report_is_measured_anew_and_the_report_command_names_it(run, analysed):
    (run / "analysis" / "report.json").write_text(f'{{"schema_version": {REPORT_SCHEMA_VERSION}, "pairs": [')
    with pytest.raises(ReportError, match=r"report\.json is not valid JSON"):
        write_report(run)
    assert analyze_run(run, ANALYSIS).pairs == analysed[1].pairs


@pytest.mark.parametrize("target", ["analysis is a file", "a full disk"])
def test_a_target_that_cannot_be_written_is_refused_before_any_measure(run, target, caplog):
    import resource
    import signal

    shutil.rmtree(run / "analysis")
    if target == "analysis is a file":
        (run / "analysis").write_text("not a folder")
        message = r"Cannot write into .*analysis .*make it writable"
        limit = None
    else:
        message = r"disk is full or failing"
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, limit[1]))
    try:
        with caplog.at_level("INFO", logger="hf_stability.analysis.runner"), pytest.raises(Exception, match=message):
            analyze_run(run, ANALYSIS)
    finally:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)
            signal.signal(signal.SIGXFSZ, previous)
    assert "Measured" not in caplog.text  # nothing was measured for a report that could not be written


def test_a_damaged_record_of_a_diverged_child_is_named(run):
    shutil.rmtree(run / CHILD / "final")  # as a child whose loss became NaN: no final/, a diverged.json
    (run / CHILD / "diverged.json").write_bytes(b"\xff\xfe garbage")
    damaged = r"diverged\.json is not UTF-8 text: the file is damaged.*"
    with pytest.raises(RunDirectoryError, match=damaged + CHILD_REMEDY):
        analyze_run(run, ANALYSIS)


def test_checksums_computed_ahead_are_those_of_the_files_as_verified(tmp_path):
    """BackgroundDigests hashes a study's files in threads before verify reads them; a large
    file's checksum is compared later (its size at once); a file that changes in between (same
    size, new bytes) is hashed again, so the damage is still caught."""
    from hf_stability.manifest import LATER_BYTES, BackgroundDigests, verify, write_manifest

    sizes = {"small0.bin": 100_000, "small1.bin": 100_000, "large0.bin": LATER_BYTES, "large1.bin": 2 * LATER_BYTES}
    files = {name: tmp_path / name for name in sizes}
    for i, (name, size) in enumerate(sizes.items()):
        files[name].write_bytes(bytes([i]) * size)
    manifest = tmp_path / "manifest.json"
    write_manifest(manifest, files, "fingerprint")
    digests = BackgroundDigests(list(files.values()), workers=2)
    try:
        later = []
        assert set(verify(manifest, tmp_path, lambda name: "redo", later=later, digests=digests)) == set(files)
        assert sorted(check.file.name for check in later) == ["large0.bin", "large1.bin"]
        for check in later:
            check.run(digests)  # intact
        time.sleep(0.05)  # past the file system's timestamp granularity: the rewrite has a new mtime
        files["large1.bin"].write_bytes(bytes([9]) * sizes["large1.bin"])
        with pytest.raises(RunDirectoryError, match="large1.bin does not match the checksum"):
            later[1].run(digests)
        files["small0.bin"].write_bytes(bytes([9]) * sizes["small0.bin"])  # a small file: compared in verify
        with pytest.raises(RunDirectoryError, match="small0.bin does not match the checksum"):
            verify(manifest, tmp_path, lambda name: "redo", later=[], digests=digests)
        files["large0.bin"].write_bytes(b"short")  # a size is checked at once, whatever the file's size
        with pytest.raises(RunDirectoryError, match="large0.bin has 5 bytes"):
            verify(manifest, tmp_path, lambda name: "redo", only=lambda name: name.startswith("large"),
                   later=[], digests=digests)
    finally:
        digests.close()


@pytest.mark.parametrize("damaged", ["parent/final", f"{CHILD}/final"])
def test_damaged_weights_found_while_measuring_leave_no_report(run, damaged):
    """Weights are hashed in the background while the analysis runs: a damage found then stops it
    before any report is written."""
    _flip(run / damaged / "model.safetensors")
    (run / "analysis" / "report.json").unlink()
    with pytest.raises(RunDirectoryError, match=r"model\.safetensors does not match the checksum"):
        analyze_run(run, ANALYSIS)
    assert not (run / "analysis" / "report.json").exists()
