"""One reader for everything hf_stability reads back from a run directory.

Run directories get copied, synced, uploaded and downloaded; files get truncated and bytes
flip. Every read here turns a decode error into a ``RunDirectoryError`` that names the file
and the narrowest remedy the caller knows, and checks the shape of what it read, so that a
damaged file is never a raw traceback and never a silently shorter or different record.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import RunDirectoryError


def _refuse(path: Path, problem: str, remedy: str) -> RunDirectoryError:
    return RunDirectoryError(f"{path} {problem}. {remedy}", path=path)


def read_json(path: str | Path, remedy: str, expect: type = dict) -> Any:
    """The JSON value in ``path``, which must be a ``expect`` (an object by default).

    Raises:
        RunDirectoryError: the file is missing, unreadable, not UTF-8, not JSON or of another shape.
    """
    path = Path(path)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise _refuse(path, "is missing", remedy) from None
    except OSError as err:
        raise _refuse(path, f"cannot be read ({err.strerror or err})", remedy) from None
    except UnicodeDecodeError:
        raise _refuse(path, "is not UTF-8 text: the file is damaged", remedy) from None
    except json.JSONDecodeError as err:
        problem = f"is not valid JSON ({err.msg} at line {err.lineno}): the file is damaged"
        raise _refuse(path, problem, remedy) from None
    if not isinstance(value, expect):
        raise _refuse(path, f"holds a JSON {type(value).__name__}, not a {expect.__name__}: the file is damaged",
                      remedy)
    return value


def read_divergence(path: str | Path, remedy: str, finished: bool) -> list[dict[str, Any]]:
    """The ``{"step", "l2"}`` lines of a child's ``divergence.jsonl``, in strictly increasing steps.

    ``finished``: the child has finished, so its record is complete and every line must be whole;
    otherwise (a killed child) a torn last line is what a killed writer leaves and is dropped.

    Raises:
        RunDirectoryError: a line that is not a record (or a torn line of a finished child), a
            step that does not increase, or an L2 that is not a number.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        if finished:
            raise _refuse(path, "is missing", remedy) from None
        return []
    except OSError as err:
        raise _refuse(path, f"cannot be read ({err.strerror or err})", remedy) from None
    except UnicodeDecodeError:
        raise _refuse(path, "is not UTF-8 text: the file is damaged", remedy) from None
    lines = text.split("\n")
    torn_tail = not text.endswith("\n")
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        last = number == len(lines) and torn_tail
        try:
            row = json.loads(line)
            valid = (isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool)
                     and isinstance(row.get("l2"), (int, float)) and not isinstance(row["l2"], bool))
        except json.JSONDecodeError:
            valid = False
        if not valid:
            if last and not finished:
                break  # a killed writer's torn line
            raise _refuse(path, f"line {number} is no {{\"step\", \"l2\"}} record ({line[:80]!r}): the file is damaged",
                          remedy)
        if rows and row["step"] <= rows[-1]["step"]:
            raise _refuse(path, f"line {number} repeats or goes back to step {row['step']} (after step "
                          f"{rows[-1]['step']}): the file is damaged", remedy)
        if not math.isfinite(float(row["l2"])) and finished:
            raise _refuse(path, f"line {number} has the L2 {row['l2']} in a finished child", remedy)
        rows.append(row)
    return rows


def load_saved_dataset(path: str | Path, remedy: str) -> Any:
    """A ``datasets.Dataset`` saved with ``save_to_disk`` (the run's data/train and data/eval).

    Raises:
        RunDirectoryError: the folder is missing or its files are damaged.
    """
    from datasets import load_from_disk

    path = Path(path)
    try:
        dataset = load_from_disk(str(path))
        len(dataset)  # touch the table: a damaged arrow file fails here, not in the middle of an analysis
        if len(dataset):
            dataset[len(dataset) - 1]
    except FileNotFoundError as err:
        raise _refuse(path, f"is missing or incomplete ({err})", remedy) from None
    except Exception as err:  # pyarrow's ArrowInvalid, a JSONDecodeError in state.json, ...: all a damaged folder
        raise _refuse(path, f"cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0][:200]}): the saved "
                      "data is damaged", remedy) from None
    return dataset
