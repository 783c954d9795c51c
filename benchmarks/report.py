"""What every benchmark ends with: its result printed as JSON, and written to --output if given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: Any, output: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n", encoding="utf-8")
