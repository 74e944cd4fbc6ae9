"""`entraflow audit`: the membership changes entraflow made or was refused, newest first."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from cli.output import print_json
from cli.runs import parse_since
from entraflow.settings import get_settings
from models.audit import CauseKind, list_audit_entries

DEFAULT_AUDIT_LIMIT = 50


@click.command()
@click.option("--user", "user_id", help="Only changes of this user (id or UPN, as asked).")
@click.option("--group", "group_id", help="Only changes of this group.")
@click.option("--since", help="Only changes since: 30m, 2h, 7d, or an ISO time.")
@click.option("--run", "run_id", help="Only changes made by this flow run.")
@click.option("--batch", "batch_id", help="Only changes made by this batch.")
@click.option("--limit", type=click.IntRange(min=1), default=DEFAULT_AUDIT_LIMIT, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def audit(
    user_id: str | None,
    group_id: str | None,
    since: str | None,
    run_id: str | None,
    batch_id: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List group-membership changes and refusals, newest first."""
    entries = list_audit_entries(
        get_settings().resolved_database_url,
        limit=limit,
        user_id=user_id,
        group_id=group_id,
        since=parse_since(since) if since else None,
        run_id=run_id,
        batch_id=batch_id,
    )
    if as_json:
        print_json(entries)
        return
    table = Table("time", "action", "user", "group", "outcome", "as", "cause", "request id")
    for entry in entries:
        connection = entry["connection"]
        if entry["cause"] == CauseKind.FLOW_RUN:
            cause = f"run {entry['run_id']} step {entry['step_id']}"
        else:
            cause = f"batch {entry['batch_id']} row {entry['batch_row']}"
        outcome = entry["outcome"]
        if entry["error_message"]:
            outcome = f"{outcome}: {entry['error_message']}"
        table.add_row(
            f"{entry['time']:%Y-%m-%d %H:%M:%S}",
            entry["action"],
            entry["user_id"] or "",
            entry["group_id"] or "",
            outcome,
            f"{connection['kind']} {connection['account'] or connection['app_id'] or ''}",
            cause,
            entry["graph_request_id"] or "",
        )
    Console().print(table)
