"""Strict JSON: what `json.loads` takes but a database or a plain dict would not, refused.

Python's decoder takes NaN and Infinity (PostgreSQL refuses them), keeps the last of two equal
keys (PostgreSQL's json keeps both) and fails with RecursionError on deep nesting. Events and
batch files are read through `strict_loads`, which refuses all three with a reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

# The most of a value a reason quotes: a reason names a value, it does not carry it.
SHOWN_CHARS = 60


class StrictJSONError(ValueError):
    """Raised when text is not JSON entraflow can store; the text completes "<the input> ..."."""


class NestedTooDeeply(StrictJSONError):
    """Raised when JSON nests objects and arrays deeper than Python's recursion can follow."""


def strict_loads(
    text: str,
    *,
    parse_int: Callable[[str], Any] | None = None,
    parse_float: Callable[[str], Any] | None = None,
) -> Any:
    """`text` decoded as JSON, or StrictJSONError saying what it holds that we refuse."""
    try:
        return json.loads(
            text,
            parse_int=parse_int,
            parse_float=parse_float,
            parse_constant=_refuse_constant,
            object_pairs_hook=_unique_keys,
        )
    except json.JSONDecodeError as exc:
        raise StrictJSONError(f"is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise NestedTooDeeply("is nested too deeply") from exc


def shown(value: Any) -> str:
    """`value`'s repr, cut short."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} chars)"


def _refuse_constant(name: str) -> Any:
    raise StrictJSONError(f"holds {name}, which JSON does not allow")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise StrictJSONError(f"has the key {shown(key)} twice in one object")
            seen.add(key)
    return value
