"""Publishing events: a CloudEvents 1.0 event in structured JSON on the `entraflow:events` stream.

This module is the contract between producers and the scheduler: `parse_event` holds the rules
an event must meet, the scheduler enforces them on every entry it reads, and the publishing
functions check them first, so a producer gets an `InvalidEvent` instead of a dead letter.

    client = redis.Redis.from_url("redis://localhost:6379/0")
    publish_event(client, type="hr.employee.hired", source="hr/workday",
                  data={"user_id": "...", "department": "Sales"})

From another language, the same as one command:
`XADD entraflow:events * event '{"specversion": "1.0", "id": ..., "source": ..., "type": ...}'`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import redis

from entraflow import keys

# The largest event the scheduler accepts, in bytes of its JSON (issue 3: 256 KiB).
MAX_EVENT_BYTES = 256 * 1024
SPECVERSION = "1.0"
# The stream entry's one field.
EVENT_FIELD = "event"
# CloudEvents extension attribute names: lower-case ASCII letters and digits.
_EXTENSION_NAME = re.compile(r"^[a-z0-9]+$")
_REQUIRED_ATTRIBUTES = ("id", "source", "type")


class InvalidEvent(ValueError):
    """Raised when an event is not a CloudEvents 1.0 event entraflow can use; says why."""


def parse_event(raw: bytes | str) -> dict[str, Any]:
    """The event in `raw` as a dict, or `InvalidEvent` with the first rule it breaks."""
    encoded = raw.encode() if isinstance(raw, str) else raw
    if len(encoded) > MAX_EVENT_BYTES:
        raise InvalidEvent(f"event is {len(encoded)} bytes; the limit is {MAX_EVENT_BYTES}")
    try:
        # Decoded here, not by json.loads: given bytes it would also take UTF-16 and UTF-32.
        text = encoded.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"event is not UTF-8: {exc}") from exc
    try:
        event = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidEvent(f"event is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidEvent("event is not JSON this parser can read: nested too deeply") from exc
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
            raise InvalidEvent(f"{name!r} must be a non-empty string, not {value!r}")
    if "data_base64" in event:
        raise InvalidEvent("'data_base64' is not supported: flows read 'data' as a JSON object")
    data = event.get("data")
    if data is not None and not isinstance(data, dict):
        raise InvalidEvent(f"'data' must be a JSON object, not a JSON {_json_kind(data)}")


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
