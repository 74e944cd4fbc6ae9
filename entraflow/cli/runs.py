"""`entraflow runs ...`: the run history."""

from __future__ import annotations

import click

from entraflow.cli.output import fail_json, print_json
from entraflow.settings import get_settings
from models.history import list_runs, show_run

DEFAULT_LIST_LIMIT = 50


@click.group()
def runs() -> None:
    """Read the history of flow runs."""


@runs.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=DEFAULT_LIST_LIMIT, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def list_command(limit: int, as_json: bool) -> None:
    """List runs, newest first."""
    found = list_runs(get_settings().resolved_database_url, limit=limit)
    if as_json:
        print_json(found)
        return
    for run in found:
        click.echo(
            f"{run['id']}  {run['status']:<9}  {run['flow']}  {run['created_at']:%Y-%m-%d %H:%M:%S}"
        )


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
