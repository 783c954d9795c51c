"""The package as installed and imported: every package folder is in the wheel, the top level is
lazy (a light command never imports the training stack), errors.py only declares."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_for_the_wheel():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hf_stability").rglob("__init__.py")}
    assert listed == found | {"hf_stability.model_cards"}
    assert (ROOT / "model_cards" / "__init__.py").is_file()
    assert (ROOT / "model_cards" / "divergence_report.md").is_file()


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return set(out.stdout.split())


def test_the_report_stage_and_the_top_level_import_no_training_stack():
    for statement in ("import hf_stability.report", "import hf_stability", "from hf_stability import errors",
                      "from hf_stability.report import load_report, write_report"):
        modules = _imported_after(statement)
        assert not {"torch", "transformers", "transformers.trainer", "datasets"} & modules, statement


def test_the_public_names_resolve_where_the_docs_say():
    import hf_stability
    from hf_stability import analysis, studies, training

    for package in (hf_stability, analysis, training, studies):
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
    assert hf_stability.StabilityTrainer.__mro__[1] is hf_stability.StabilityMixin


def test_errors_py_only_declares_exceptions():
    tree = ast.parse((ROOT / "hf_stability" / "errors.py").read_text())
    for node in tree.body:
        assert isinstance(node, (ast.ClassDef, ast.ImportFrom, ast.Import, ast.Expr)), ast.dump(node)[:80]
        if isinstance(node, ast.ClassDef):
            assert node.name.endswith("Error"), node.name
