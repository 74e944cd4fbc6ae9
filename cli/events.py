"""`entraflow events push` and `events dead`: put an event on the stream, read the dead letters."""

from __future__ import annotations

import json
from typing import IO, Any

import click
import redis

from cli.output import print_json
from entraflow import keys
from entraflow.redis_server import redis_url
from entraflow.settings import get_settings
from scheduler.producer import InvalidEvent, build_event, parse_event, publish_raw

# Dead letters `events dead` shows unless told otherwise.
DEFAULT_DEAD_LIMIT = 20


@click.group()
def events() -> None:
    """Events on the Redis stream the scheduler reads."""


@events.command()
@click.option("--type", "type_", help="The CloudEvents type, which flows trigger on.")
@click.option("--source", help="The CloudEvents source: who produced the event.")
@click.option("--data", help="The event's data, a JSON object.")
@click.option(
    "--id", "id_", help="The event id (default: a new UUID); same source+id = same event."
)
@click.option(
    "--file",
    "file",
    type=click.File("rb"),
    help="A whole CloudEvent as JSON ('-' for stdin), instead of --type/--source/--data/--id.",
)
@click.option("--json", "as_json", is_flag=True, help="Print {id, stream_id} as JSON.")
def push(
    type_: str | None,
    source: str | None,
    data: str | None,
    id_: str | None,
    file: IO[bytes] | None,
    as_json: bool,
) -> None:
    """Check an event and add it to the stream; print its id."""
    try:
        if file is not None:
            if type_ or source or data or id_:
                raise click.UsageError(
                    "--file holds the whole event: drop --type/--source/--data/--id"
                )
            raw: bytes | str = file.read()
            event = parse_event(raw)
        else:
            if not type_ or not source:
                raise click.UsageError("give --type and --source (or --file)")
            event = build_event(type=type_, source=source, data=_data(data), id=id_)
            raw = json.dumps(event)
        stream_id = publish_raw(_client(), raw)
    except InvalidEvent as exc:
        raise click.ClickException(f"not pushed: {exc}") from exc
    except redis.RedisError as exc:
        raise click.ClickException(f"not pushed: Redis: {exc}") from exc
    if as_json:
        print_json({"id": event["id"], "stream_id": stream_id})
    else:
        click.echo(event["id"])


@events.command()
@click.option("--limit", type=click.IntRange(min=1), default=DEFAULT_DEAD_LIMIT, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def dead(limit: int, as_json: bool) -> None:
    """The newest dead letters: events that could not be used, with the reason."""
    entries: Any = _client().xrevrange(keys.DEAD_EVENTS_STREAM, count=limit)
    letters = [
        {"dead_id": _text(dead_id), **{_text(k): _text(v) for k, v in fields.items()}}
        for dead_id, fields in entries
    ]
    if as_json:
        print_json(letters)
        return
    if not letters:
        click.echo("No dead letters.")
    for letter in letters:
        when, stream_id = letter.get("time", "?"), letter.get("stream_id", "?")
        click.echo(f"{when}  {stream_id}  {letter.get('reason', '?')}")


def _data(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--data") from exc
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--data")
    return value


def _client() -> redis.Redis:
    return redis.Redis.from_url(redis_url(get_settings()))


def _text(value: bytes | str) -> str:
    # A dead letter's event may not be UTF-8: that can be why it is dead.
    return value.decode(errors="replace") if isinstance(value, bytes) else value
