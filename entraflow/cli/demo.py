"""`entraflow demo`: the whole system on embedded defaults, one flow of all four actions."""

from __future__ import annotations

import os
import time
from typing import Any

import click

from entraflow.settings import get_settings
from models.history import wait_for_run
from scheduler.runs import start_run

# How long the demo waits for its run before calling it failed.
DEMO_RUN_TIMEOUT_S = 120.0

DEMO_FLOW = "demo-add-then-remove"
DEMO_STEPS: list[dict[str, Any]] = [
    {"id": "user", "action": "lookup_user", "with": {"upn": "{{ event.data.upn }}"}},
    {"id": "group", "action": "lookup_group", "with": {"group_id": "{{ event.data.group_id }}"}},
    {
        "id": "add",
        "action": "add_user_to_group",
        "with": {"user_id": "{{ steps.user.id }}", "group_id": "{{ steps.group.id }}"},
    },
    {
        "id": "remove",
        "action": "remove_member_from_group",
        "with": {"user_id": "{{ steps.user.id }}", "group_id": "{{ steps.group.id }}"},
        "if": "{{ steps.add.success }}",
    },
]


@click.command()
def demo() -> None:
    """Start Redis, the Graph sandbox and a worker; run a flow of all four actions; stop."""
    from entraflow.cli.stack import LocalStack
    from sandbox.directory import DEMO_GROUPS, DEMO_USERS

    started = time.monotonic()
    settings = get_settings()
    click.echo("Starting Redis, the Graph sandbox and a Celery worker...")
    with LocalStack(
        home=settings.home, redis_url=settings.redis_url, database_url=settings.database_url
    ) as stack:
        # This process queues the run: it must reach the same Redis and database as the worker.
        os.environ.update(stack.env)
        get_settings.cache_clear()
        click.echo(f"  Redis       {stack.redis_url}")
        click.echo(f"  Graph       {stack.sandbox.graph_url} (the sandbox)")
        click.echo(f"  run history {stack.settings.resolved_database_url}")
        event = {
            "specversion": "1.0",
            "id": f"demo-{time.time_ns()}",
            "source": "entraflow/demo",
            "type": "demo.membership.checked",
            "data": {"upn": DEMO_USERS["nestor"].upn, "group_id": DEMO_GROUPS["sales"].id},
        }
        queued = time.monotonic()
        run_id = start_run(stack.settings, DEMO_FLOW, DEMO_STEPS, event)
        click.echo(f"\nQueued run {run_id} of flow {DEMO_FLOW!r} as a Celery chain of 4 tasks.")
        run = wait_for_run(
            stack.settings.resolved_database_url, run_id, timeout_s=DEMO_RUN_TIMEOUT_S
        )
        run_s = time.monotonic() - queued
        for step in run["steps"]:
            click.echo(f"\n[{step['status']}] {step['id']}: {step['action']}")
            click.echo(f"  inputs:  {step['inputs']}")
            click.echo(
                f"  output:  {step['output']}" if step["output"] else f"  error:   {step['error']}"
            )
    total_s = time.monotonic() - started
    click.echo(f"\nRun {run['status']} in {run_s:.2f} s (demo total {total_s:.1f} s).")
    click.echo(f"See it again with: entraflow runs show {run_id}")
    if run["status"] != "succeeded":
        raise SystemExit(1)
