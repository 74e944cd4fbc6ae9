"""The producer API: CloudEvents built, checked before sending, and added to the stream."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import pytest
import redis

from entraflow import keys
from scheduler.producer import InvalidEvent, build_event, parse_event, publish_event, publish_raw


def stream(fake_redis: redis.Redis) -> list[dict[str, Any]]:
    entries: Any = fake_redis.xrange(keys.EVENTS_STREAM)
    return [json.loads(fields[b"event"]) for _, fields in entries]


def test_publish_event_adds_a_structured_cloudevent_and_returns_its_id(
    fake_redis: redis.Redis,
) -> None:
    event_id = publish_event(
        fake_redis,
        type="hr.employee.hired",
        source="hr/workday",
        data={"user_id": "u1", "department": "Sales"},
        subject="u1",
        tenant="contoso",
    )

    [event] = stream(fake_redis)
    assert event_id == event["id"] and uuid.UUID(event_id).version == 4
    assert event["specversion"] == "1.0"
    assert (event["type"], event["source"], event["subject"]) == (
        "hr.employee.hired",
        "hr/workday",
        "u1",
    )
    assert event["datacontenttype"] == "application/json"
    assert event["data"] == {"user_id": "u1", "department": "Sales"}
    assert event["tenant"] == "contoso"
    assert datetime.fromisoformat(event["time"]).tzinfo is not None


def test_a_given_id_is_kept(fake_redis: redis.Redis) -> None:
    assert publish_event(fake_redis, type="t", source="s", id="evt-7") == "evt-7"
    assert stream(fake_redis)[0]["id"] == "evt-7"


def test_publish_raw_returns_the_stream_id(fake_redis: redis.Redis) -> None:
    raw = json.dumps({"specversion": "1.0", "id": "1", "source": "s", "type": "t"})

    stream_id = publish_raw(fake_redis, raw)

    [(entry_id, fields)] = fake_redis.xrange(keys.EVENTS_STREAM)
    assert entry_id.decode() == stream_id
    assert fields == {b"event": raw.encode()}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("nope", "not JSON"),
        ('"a string"', "JSON string, not an object"),
        ('{"specversion": "1.0", "source": "s", "type": "t"}', "'id' must be a non-empty string"),
        ('{"specversion": "1.0", "id": "1", "source": "s", "type": "t", "data": 3}', "JSON number"),
    ],
)
def test_publish_raw_refuses_an_invalid_event_and_pushes_nothing(
    fake_redis: redis.Redis, raw: str, reason: str
) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        publish_raw(fake_redis, raw)
    assert fake_redis.exists(keys.EVENTS_STREAM) == 0


def test_an_event_over_the_cap_is_refused_before_sending(fake_redis: redis.Redis) -> None:
    with pytest.raises(InvalidEvent, match="the limit is 262144"):
        publish_event(fake_redis, type="t", source="s", data={"blob": "x" * 300_000})
    assert fake_redis.exists(keys.EVENTS_STREAM) == 0


@pytest.mark.parametrize("name", ["Tenant", "trace-id", "specversion"])
def test_a_bad_extension_attribute_name_is_refused(name: str) -> None:
    with pytest.raises(InvalidEvent, match="extension attribute"):
        build_event(type="t", source="s", **{name: "x"})


def test_an_empty_type_is_refused() -> None:
    with pytest.raises(InvalidEvent, match="'type' must be a non-empty string"):
        build_event(type="", source="s")


def test_parse_event_treats_null_data_as_no_data() -> None:
    event = parse_event(
        b'{"specversion": "1.0", "id": "1", "source": "s", "type": "t", "data": null}'
    )
    assert event["data"] is None


@pytest.mark.parametrize(
    ("encoding", "reason"),
    # Without a byte order mark, UTF-16 text of ASCII is valid UTF-8 with NULs: not JSON.
    [("utf-16", "not UTF-8"), ("utf-32", "not UTF-8"), ("utf-16-le", "not JSON")],
)
def test_an_event_in_another_unicode_encoding_is_refused(encoding: str, reason: str) -> None:
    # json.loads would take these bytes; producers are told events are UTF-8 JSON.
    raw = json.dumps(build_event(type="t", source="s", id="1")).encode(encoding)

    with pytest.raises(InvalidEvent, match=reason):
        parse_event(raw)


def test_a_nul_after_the_opening_brace_is_not_json_rather_than_utf16() -> None:
    # Found by the chaos suite's poison scenario: b'{\x00...' was reported as bad UTF-16.
    with pytest.raises(InvalidEvent, match="not JSON"):
        parse_event(b'{\x00"a": 1}')
