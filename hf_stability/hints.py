"""How messages name an option, for Python and command-line users alike."""

from __future__ import annotations

from typing import Any


def setting(name: str, value: Any = True, flag: str | None = None) -> str:
    """An option as messages name it, for Python and command-line users alike:
    ``overwrite_run=True (--overwrite_run)``, ``alignment='none' (--alignment none)``."""
    if flag is None:
        flag = f"--{name}" if value is True else f"--{name} {value}"
    return f"{name}={value!r} ({flag})"
