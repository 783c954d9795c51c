"""String choices as enums (transformers' ``ExplicitEnum`` pattern): ``--help`` lists their
values, a value given as a plain string converts, and a wrong one says which values exist."""

from __future__ import annotations

from enum import Enum

from .errors import ArgumentsError


class ExplicitEnum(str, Enum):
    """An enum of strings; ``Kind("x")`` for an unknown "x" raises ``__error__`` (an
    ``ArgumentsError``) listing the values; ``__label__`` names the choice in that message."""

    @classmethod
    def _missing_(cls, value: object):
        label = getattr(cls, "__label__", cls.__name__)
        error = getattr(cls, "__error__", ArgumentsError)
        raise error(f"Unknown {label} {value!r}: choose one of {', '.join(m.value for m in cls)}.")

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def values(cls) -> list[str]:
        return [m.value for m in cls]


def plain(value: object) -> object:
    """``value`` with every enum member replaced by its value (dicts and lists walked): what a
    dataclass's ``to_dict`` returns, equal to what its JSON reads back."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
