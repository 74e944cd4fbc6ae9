"""`entraflow events push` and `events dead`, run in process on the session's Redis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result

from cli.main import cli
from entraflow import keys
from entraflow.settings import Settings
from scheduler.intake import Scheduler


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def stream(redis_client: redis.Redis) -> list[dict[str, Any]]:
    entries: Any = redis_client.xrange(keys.EVENTS_STREAM)
    return [json.loads(fields[b"event"]) for _, fields in entries]


def test_push_with_type_source_and_data_prints_the_event_id(
    settings: Settings, redis_client: redis.Redis
) -> None:
    result = invoke(
        "events", "push", "--type", "hr.employee.hired", "--source", "cli", "--data", '{"a": 1}'
    )

    assert result.exit_code == 0, result.output
    [event] = stream(redis_client)
    assert result.output.strip() == event["id"]
    assert (event["type"], event["source"], event["data"]) == ("hr.employee.hired", "cli", {"a": 1})


def test_push_json_prints_the_id_and_the_stream_id(
    settings: Settings, redis_client: redis.Redis
) -> None:
    result = invoke("events", "push", "--type", "t", "--source", "s", "--id", "e9", "--json")

    assert result.exit_code == 0, result.output
    [(stream_id, _)] = redis_client.xrange(keys.EVENTS_STREAM)
    assert json.loads(result.output) == {"id": "e9", "stream_id": stream_id.decode()}


def test_push_file_sends_the_whole_event_as_written(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    event = {"specversion": "1.0", "id": "f1", "source": "file", "type": "t", "data": {"x": 1}}
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event))

    result = invoke("events", "push", "--file", str(path))

    assert result.exit_code == 0, result.output
    assert result.output.strip() == "f1"
    assert stream(redis_client) == [event]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--type", "t", "--source", "s", "--data", "{nope"], "not JSON"),
        (["--type", "t", "--source", "s", "--data", "[1]"], "must be a JSON object"),
        (["--type", "t", "--data", "{}"], "give --type and --source"),
        (["--type", "", "--source", "s"], "give --type and --source"),
        (["--file", "EVENT", "--type", "t"], "--file holds the whole event"),
        (["--file", "EVENT"], "specversion must be '1.0'"),
    ],
)
def test_bad_input_exits_non_zero_with_a_message_and_pushes_nothing(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path, args: list[str], message: str
) -> None:
    path = tmp_path / "event.json"
    path.write_text(json.dumps({"specversion": "0.3", "id": "1", "source": "s", "type": "t"}))

    result = invoke("events", "push", *[str(path) if a == "EVENT" else a for a in args])

    assert result.exit_code != 0
    assert message in result.output
    assert redis_client.exists(keys.EVENTS_STREAM) == 0


def test_dead_lists_dead_letters_newest_first_with_their_reasons(
    settings: Settings, redis_client: redis.Redis
) -> None:
    redis_client.xadd(keys.EVENTS_STREAM, {"event": "not json"})
    redis_client.xadd(keys.EVENTS_STREAM, {"event": "[]"})
    Scheduler(settings, redis_client, "s1").step()

    listed = json.loads(invoke("events", "dead", "--json").output)
    text = invoke("events", "dead", "--limit", "1").output

    assert [letter["event"] for letter in listed] == ["[]", "not json"]
    assert "not an object" in listed[0]["reason"] and "not JSON" in listed[1]["reason"]
    assert all(letter["consumer"] == "s1" and letter["stream_id"] for letter in listed)
    assert "not an object" in text and "not JSON" not in text
