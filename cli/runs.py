"""`entraflow runs ...`: the run history."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import click
from rich.console import Console
from rich.table import Table

from cli.output import fail_json, print_json
from entraflow.settings import get_settings
from models.history import list_runs, prune_history, show_run
from models.runs import RunStatus, utcnow
from scheduler.replay import ReplayError, failed_run_ids, replay_run

DEFAULT_LIST_LIMIT = 50
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str) -> datetime:
    """`30m`, `2h`, `7d` (that long ago) or an ISO 8601 time."""
    match = _DURATION.match(value.strip())
    if match:
        return utcnow() - timedelta(seconds=int(match[1]) * _UNIT_S[match[2]])
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: give a duration like 30m, 2h, 7d or an ISO time"
        ) from None
    return (moment if moment.tzinfo else moment.astimezone()).astimezone(UTC)


@click.group()
def runs() -> None:
    """Read the history of flow runs."""


@runs.command("list")
@click.option("--flow", help="Only runs of this flow.")
@click.option("--status", type=click.Choice([s.value for s in RunStatus]), help="Only this status.")
@click.option("--since", help="Only runs created since: 30m, 2h, 7d, or an ISO time.")
@click.option("--limit", type=click.IntRange(min=1), default=DEFAULT_LIST_LIMIT, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def list_command(
    flow: str | None, status: str | None, since: str | None, limit: int, as_json: bool
) -> None:
    """List runs, newest first."""
    found = list_runs(
        get_settings().resolved_database_url,
        limit=limit,
        flow=flow,
        status=RunStatus(status) if status else None,
        since=parse_since(since) if since else None,
    )
    if as_json:
        print_json(found)
        return
    table = Table("run", "flow", "status", "event", "created", "error")
    for run in found:
        table.add_row(
            run["id"],
            run["flow"],
            run["status"],
            run["event_id"] or "",
            f"{run['created_at']:%Y-%m-%d %H:%M:%S}",
            run["error"] or "",
        )
    Console().print(table)


@runs.command("show")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show_command(run_id: str, as_json: bool) -> None:
    """Show one run and each of its steps."""
    run = show_run(get_settings().resolved_database_url, run_id)
    if run is None:
        fail_json({"outcome": "not_found", "message": f"no run {run_id!r}"})
    if as_json:
        print_json(run)
        return
    click.echo(f"run {run['id']}  flow {run['flow']}  {run['status']}")
    if run["error"]:
        click.echo(f"  error: {run['error']}")
    for step in run["steps"]:
        line = f"  {step['id']:<12} {step['action']:<26} {step['status']:<9}"
        click.echo(f"{line} attempts={step['attempts']}")
        if step["output"] is not None:
            click.echo(f"    output: {step['output']}")
        if step["error"] is not None:
            click.echo(f"    error:  {step['error'].get('message')}")


@runs.command("replay")
@click.argument("run_id", required=False)
@click.option(
    "--status",
    type=click.Choice([RunStatus.FAILED.value]),
    help="Replay every run in this status (only `failed` can be replayed).",
)
@click.option("--flow", help="With --status: only runs of this flow.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def replay_command(run_id: str | None, status: str | None, flow: str | None, as_json: bool) -> None:
    """Run failed runs again from their failed step, keeping earlier steps' outputs."""
    settings = get_settings()
    if (run_id is None) == (status is None):
        raise click.UsageError("give a RUN_ID, or --status failed [--flow NAME]")
    if run_id is not None and flow is not None:
        raise click.UsageError("--flow goes with --status, not with a RUN_ID")
    run_ids = [run_id] if run_id is not None else failed_run_ids(settings, flow=flow)
    replayed: list[dict[str, str]] = []
    for each in run_ids:
        try:
            step_id = replay_run(settings, each)
        except ReplayError as exc:
            fail_json({"outcome": "not_replayed", "message": str(exc), "replayed": replayed})
        replayed.append({"id": each, "from_step": step_id})
        if not as_json:
            click.echo(f"replaying run {each} from step {step_id}")
    if as_json:
        print_json(replayed)
    elif not replayed:
        click.echo("no failed runs to replay")


@runs.command("prune")
@click.option(
    "--older-than",
    "older_than",
    required=True,
    help="Delete runs that ended before this: 30d, 12h, or an ISO time.",
)
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def prune_command(older_than: str, dry_run: bool, as_json: bool) -> None:
    """Delete ended runs and their steps; never a run still queued or running."""
    settings = get_settings()
    cutoff = parse_since(older_than)
    pruned = prune_history(
        settings.resolved_database_url,
        cutoff,
        events_min_keep=timedelta(days=settings.accepted_events_min_keep_days),
        dry_run=dry_run,
    )
    if as_json:
        print_json({"cutoff": cutoff, "dry_run": dry_run, **pruned.as_dict()})
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(
        f"{verb} {pruned.runs} runs ({pruned.steps} steps) that ended before"
        f" {cutoff:%Y-%m-%d %H:%M} UTC, and {pruned.accepted_events} accepted events"
    )
