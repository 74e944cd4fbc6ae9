"""Publishing events: a CloudEvents 1.0 event in structured JSON on the `entraflow:events` stream.

This module is the contract between producers and the scheduler: `parse_event` holds the rules
an event must meet, the scheduler enforces them on every entry it reads, and the publishing
functions check them first, so a producer gets an `InvalidEvent` instead of a dead letter.
Beyond CloudEvents, an event must be one every database stores alike and no code chokes on:
`id`, `source` and `type` of at most 1 KiB each, at most 64 levels of nesting, integers of at
most 100 digits, finite numbers (no NaN or Infinity), no key twice in one object, and no NUL or
lone surrogate in any string (issue 13).

    client = redis.Redis.from_url("redis://localhost:6379/0")
    publish_event(client, type="hr.employee.hired", source="hr/workday",
                  data={"user_id": "...", "department": "Sales"})

From another language, the same as one command:
`XADD entraflow:events * event '{"specversion": "1.0", "id": ..., "source": ..., "type": ...}'`.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import redis

from entraflow import keys
from scheduler.strict_json import NestedTooDeeply, StrictJSONError, shown, strict_loads

# The largest event the scheduler accepts, in bytes of its JSON (issue 3: 256 KiB).
MAX_EVENT_BYTES = 256 * 1024
SPECVERSION = "1.0"
# Bounds on `id`, `source` and `type`, in bytes of UTF-8 (CloudEvents sets none). The scheduler
# indexes (source, id) together: PostgreSQL refuses a btree entry over about 2,700 bytes, and
# before these bounds a 20 KB id failed the index on every retry, holding up every later event.
MAX_ID_BYTES = 1024
MAX_SOURCE_BYTES = 1024
# Matched against flows' trigger types, which are indexed too.
MAX_TYPE_BYTES = 1024
_MAX_ATTRIBUTE_BYTES = {"id": MAX_ID_BYTES, "source": MAX_SOURCE_BYTES, "type": MAX_TYPE_BYTES}
# Levels of objects and arrays, the event itself the first. Code that walks an event by recursion
# (templates, JSON encoders deep in a database driver) fails near 1,000 levels; real events use a
# handful.
MAX_NESTING_DEPTH = 64
# Digits of an integer. Python refuses to read one of over 4,300 digits; wider than any 64- or
# 128-bit number (20 and 39 digits), and short enough that template arithmetic on it stays cheap.
MAX_INTEGER_DIGITS = 100
_INTEGER_BOUND = 10**MAX_INTEGER_DIGITS
# What no database stores alike: NUL (PostgreSQL refuses it in text and JSON) and surrogates
# (a JSON decoder joins a valid pair into one character, so any left is lone; PostgreSQL refuses
# them, SQLite stored them, and neither is Unicode text).
_UNSTORABLE_CHARACTER = re.compile("[\x00\ud800-\udfff]")
# The stream entry's one field.
EVENT_FIELD = "event"
# CloudEvents extension attribute names: lower-case ASCII letters and digits.
_EXTENSION_NAME = re.compile(r"^[a-z0-9]+$")
_REQUIRED_ATTRIBUTES = ("id", "source", "type")


class InvalidEvent(ValueError):
    """Raised when an event is not a CloudEvents 1.0 event entraflow can use; says why."""


def parse_event(raw: bytes | str) -> dict[str, Any]:
    """The event in `raw` as a dict, or `InvalidEvent` with the first rule it breaks."""
    # A lone surrogate in a str passes as bytes that are not UTF-8, refused below.
    encoded = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if len(encoded) > MAX_EVENT_BYTES:
        raise InvalidEvent(f"event is {len(encoded)} bytes; the limit is {MAX_EVENT_BYTES}")
    try:
        # Decoded here, not by json.loads: given bytes it would also take UTF-16 and UTF-32.
        text = encoded.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"event is not UTF-8: {exc}") from exc
    try:
        event = strict_loads(text, parse_int=_integer, parse_float=_float)
    except NestedTooDeeply as exc:
        raise InvalidEvent(
            f"event is nested too deeply: over {MAX_NESTING_DEPTH} levels of objects and arrays"
        ) from exc
    except StrictJSONError as exc:
        raise InvalidEvent(f"event {exc}") from exc
    check_event(event)
    return dict(event)


def check_event(event: Any) -> None:
    """Raise `InvalidEvent` unless `event` is a CloudEvents 1.0 event with an object as data."""
    if not isinstance(event, dict):
        raise InvalidEvent(f"event is a JSON {_json_kind(event)}, not an object")
    if event.get("specversion") != SPECVERSION:
        raise InvalidEvent(f"specversion must be {SPECVERSION!r}, not {event.get('specversion')!r}")
    for name in _REQUIRED_ATTRIBUTES:
        value = event.get(name)
        if not isinstance(value, str) or not value:
            raise InvalidEvent(f"{name!r} must be a non-empty string, not {shown(value)}")
    if "data_base64" in event:
        raise InvalidEvent("'data_base64' is not supported: flows read 'data' as a JSON object")
    data = event.get("data")
    if data is not None and not isinstance(data, dict):
        raise InvalidEvent(f"'data' must be a JSON object, not a JSON {_json_kind(data)}")
    _check_values(event)
    for name, limit in _MAX_ATTRIBUTE_BYTES.items():
        size = len(event[name].encode())
        if size > limit:
            raise InvalidEvent(f"{name!r} is {size} bytes in UTF-8; the limit is {limit}")


def _check_values(event: dict[str, Any]) -> None:
    """Raise `InvalidEvent` at the first value too deep, too large, or not storable text."""
    # A loop, not recursion: the event may be nested deeper than Python's recursion limit.
    stack: list[tuple[Any, int]] = [(event, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_NESTING_DEPTH:
                raise InvalidEvent(
                    f"event is nested too deeply: over {MAX_NESTING_DEPTH} levels of objects "
                    "and arrays"
                )
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key)
                stack.append((item, depth + 1))
        elif isinstance(value, str):
            _check_text(value)
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int) and not -_INTEGER_BOUND < value < _INTEGER_BOUND:
            # Counted without converting to text: that is what fails past 4,300 digits.
            raise InvalidEvent(
                f"event holds an integer of over {MAX_INTEGER_DIGITS} digits; "
                f"the limit is {MAX_INTEGER_DIGITS}"
            )
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidEvent(f"event holds {_constant_name(value)}, which JSON does not allow")


def _check_text(text: str) -> None:
    found = _UNSTORABLE_CHARACTER.search(text)
    if found is None:
        return
    code = f"U+{ord(found.group()):04X}"
    if found.group() == "\x00":
        raise InvalidEvent(f"event holds the character {code} (NUL), which databases cannot store")
    raise InvalidEvent(f"event holds a lone surrogate ({code}), which is not Unicode text")


def _integer(literal: str) -> int:
    digits = len(literal.lstrip("-"))
    if digits > MAX_INTEGER_DIGITS:
        raise InvalidEvent(
            f"event holds an integer of {digits} digits; the limit is {MAX_INTEGER_DIGITS}"
        )
    return int(literal)


def _float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise InvalidEvent(f"event holds the number {shown(literal)}, out of range of a double")
    return value


def _constant_name(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def build_event(
    *,
    type: str,
    source: str,
    data: Mapping[str, Any] | None = None,
    id: str | None = None,
    subject: str | None = None,
    **extensions: str | int | bool,
) -> dict[str, Any]:
    """A CloudEvents 1.0 event: a fresh UUID as id unless given, the current time, JSON data."""
    event: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": id if id is not None else str(uuid.uuid4()),
        "source": source,
        "type": type,
        "time": datetime.now(UTC).isoformat(),
        "datacontenttype": "application/json",
    }
    if subject is not None:
        event["subject"] = subject
    for name, value in extensions.items():
        if not _EXTENSION_NAME.match(name) or name in event or name == "data":
            raise InvalidEvent(f"{name!r} cannot be an extension attribute")
        event[name] = value
    if data is not None:
        event["data"] = dict(data)
    check_event(event)
    return event


def publish_event(
    client: redis.Redis,
    *,
    type: str,
    source: str,
    data: Mapping[str, Any] | None = None,
    id: str | None = None,
    subject: str | None = None,
    **extensions: str | int | bool,
) -> str:
    """Build an event, add it to the events stream, and return its id."""
    event = build_event(type=type, source=source, data=data, id=id, subject=subject, **extensions)
    publish_raw(client, json.dumps(event))
    return str(event["id"])


def publish_raw(client: redis.Redis, event_json: bytes | str) -> str:
    """Add an event already serialised as JSON to the events stream; return its stream id."""
    parse_event(event_json)
    stream_id = client.xadd(keys.EVENTS_STREAM, {EVENT_FIELD: event_json})
    return stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "null" if value is None else type(value).__name__
