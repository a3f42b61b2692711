"""The checks `BertODEConfig` runs on its fields: one-line ValueErrors naming the field,
the bad value and what is allowed (and, for a pairing, the field it conflicts with)."""

from __future__ import annotations

import inspect
import math
from typing import Any


def fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"BertODEConfig.{field}={value!r} is invalid; allowed: {allowed}")


def wrong_mode(field: str, value: Any, mode: str, allowed: str) -> None:
    raise ValueError(f"BertODEConfig.{field}={value!r} is invalid with BertODEConfig.mode={mode!r}; allowed: {allowed}")


def check_choice(field: str, value: Any, choices) -> None:
    if value not in choices:
        fail(field, value, ", ".join(repr(c) for c in choices))


def is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_positive(field: str, value: Any) -> None:
    if not is_number(value) or value <= 0:
        fail(field, value, "a finite number > 0")


def check_int(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(field, value, f"an integer >= {minimum}")


def check_kwargs(field: str, value: Any) -> None:
    if value is not None and not isinstance(value, dict):
        fail(field, value, "a dict or None")


def check_constructor(field: str, kwargs: dict | None, owner: str, cls: type, skip: int) -> None:
    """``kwargs`` must be keyword arguments of ``cls``'s constructor (after its ``skip``
    leading positional ones: the config for fields and blocks; the ``config_fields`` of a
    gradient method are passed by bertode and are not the user's to give)."""
    parameters = list(inspect.signature(cls).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    accepted = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.name not in getattr(cls, "config_fields", {})]
    if set(kwargs or {}) - set(accepted):
        fail(field, kwargs, f"keyword arguments of {owner}: {', '.join(accepted) or '(it takes no keyword arguments)'}")
