import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="Also run the tests marked slow (the kill-and-resume matrix); CI runs them.")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long tests (kill-and-resume matrix), run with --slow as CI does")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def analysed_study(tmp_path_factory):
    """The shared study (helpers.STUDY), trained, analysed (helpers.study_analysis()) and reported,
    once for the whole session. Read it; copy it (helpers.copy_run) to change anything."""
    from helpers import study_analysis, study_trainer

    from hf_stability.analysis import analyze_run
    from hf_stability.report import write_report

    out = tmp_path_factory.mktemp("study") / "run"
    study_trainer(out).butterfly()
    analyze_run(out, study_analysis())
    write_report(out)
    return out
