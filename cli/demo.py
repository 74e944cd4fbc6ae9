"""`entraflow demo`: the whole system on embedded defaults, example flows fed by example events."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import click
import redis
from kombu.utils.url import maybe_sanitize_url

import entraflow
from entraflow import keys
from entraflow.settings import get_settings
from models.history import wait_for_event_runs
from scheduler.flows import apply_flows
from scheduler.producer import publish_raw

# The example flows and events ship inside the entraflow package.
EXAMPLES = Path(entraflow.__file__).resolve().parent / "examples"
# How long the demo waits for the runs of its events before calling it failed.
DEMO_TIMEOUT_S = 120.0
# An event no flow can use, to show where such events go.
MALFORMED_EVENT = '{"specversion": "1.0", "type": "hr.employee.hired", "data": {}}'


@click.command()
def demo() -> None:
    """Start Redis, the sandbox, a worker and a scheduler; feed the example events; stop."""
    from harness.stack import LocalStack

    started = time.monotonic()
    settings = get_settings()
    click.echo("Starting Redis, the Graph sandbox, a Celery worker and the scheduler...")
    with LocalStack(
        home=settings.home,
        redis_url=settings.redis_url,
        database_url=settings.database_url,
        schedulers=1,
    ) as stack:
        # This process applies flows and pushes events: the same Redis and database as the rest.
        os.environ.update(stack.env)
        get_settings.cache_clear()
        settings = get_settings()
        # The password the URL carries stays off the screen.
        click.echo(f"  Redis       {maybe_sanitize_url(stack.redis_url or '')}")
        click.echo(f"  Graph       {stack.sandbox.graph_url} (the sandbox)")
        click.echo(f"  run history {maybe_sanitize_url(settings.resolved_database_url)}\n")

        for result in apply_flows(settings, EXAMPLES / "flows"):
            click.echo(f"flow {result.name}: {result.outcome} (version {result.version})")
        client = redis.Redis.from_url(stack.redis_url or "")
        pushed = time.monotonic()
        events = [_fresh(path) for path in sorted((EXAMPLES / "events").glob("*.json"))]
        for event in events:
            publish_raw(client, json.dumps(event))
        client.xadd(keys.EVENTS_STREAM, {"event": MALFORMED_EVENT})
        click.echo(f"\nPushed {len(events)} example events and 1 malformed one to the stream.")

        failures = 0
        for event in events:
            runs = wait_for_event_runs(
                settings.resolved_database_url,
                event["source"],
                event["id"],
                timeout_s=DEMO_TIMEOUT_S,
            )
            click.echo(f"\nevent {event['type']} ({event['id']}): {len(runs)} run(s)")
            for run in runs:
                failures += run["status"] != "succeeded"
                _print_run(run)
        elapsed_s = time.monotonic() - pushed
        dead = client.xrevrange(keys.DEAD_EVENTS_STREAM, count=1)
        if dead:
            reason = dict(dead[0][1] or {}).get(b"reason", b"")
            reason = reason.decode() if isinstance(reason, bytes) else reason
            click.echo(f"\nThe malformed event went to {keys.DEAD_EVENTS_STREAM}: {reason}")
        client.close()
    click.echo(
        f"\nAll runs ended {elapsed_s:.2f} s after the events were pushed "
        f"(demo total {time.monotonic() - started:.1f} s)."
    )
    click.echo("See them again with: entraflow runs list")
    if failures or not dead:
        raise SystemExit(1)


def _fresh(path: Path) -> dict[str, Any]:
    # Event ids must be unique per source: a second demo would otherwise be a duplicate.
    event: dict[str, Any] = json.loads(path.read_text())
    event["id"] = f"{event['id']}-{time.time_ns()}"
    return event


def _print_run(run: dict[str, Any]) -> None:
    click.echo(f"  run {run['id']} of flow {run['flow']!r}: {run['status']}")
    for step in run["steps"]:
        click.echo(f"    [{step['status']}] {step['id']}: {step['action']}")
        if step["inputs"]:
            click.echo(f"      inputs:  {step['inputs']}")
        if step["output"]:
            click.echo(f"      output:  {step['output']}")
        if step["error"]:
            click.echo(f"      error:   {step['error'].get('message')}")
