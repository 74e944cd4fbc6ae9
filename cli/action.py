"""`entraflow action ...`: run one Entra action now, without the queue, and print its output."""

from __future__ import annotations

from typing import Any

import click

from cli.output import fail_json, print_json
from entraflow.settings import get_settings
from worker.actions import run_action
from worker.errors import EntraflowError, GraphError
from worker.graph import GraphClient


def _run(name: str, inputs: dict[str, Any]) -> None:
    settings = get_settings()
    # A person at a terminal can wait out a long Retry-After; there is no queue to go back to.
    patient = settings.model_copy(update={"max_inprocess_wait_s": settings.max_graph_retry_time_s})
    try:
        result = run_action(GraphClient.from_settings(patient), name, inputs)
    except GraphError as exc:
        fail_json(exc.to_dict())
    except EntraflowError as exc:
        fail_json({"outcome": getattr(exc, "outcome", "invalid_input"), "message": str(exc)})
    print_json(result.output)


@click.group()
def action() -> None:
    """Run one Entra action now and print its output as JSON."""


@action.command("lookup-user")
@click.option("--user-id", help="The user's object id (a GUID) or user principal name.")
@click.option("--upn", help="The user's user principal name.")
@click.option("--email", help="The user's mail address; it must match exactly one user.")
def lookup_user(user_id: str | None, upn: str | None, email: str | None) -> None:
    """Look up a user by id, UPN or email."""
    given = {k: v for k, v in {"user_id": user_id, "upn": upn, "email": email}.items() if v}
    if len(given) != 1:
        raise click.UsageError("give exactly one of --user-id, --upn, --email")
    _run("lookup_user", given)


@action.command("lookup-group")
@click.option("--group-id", required=True, help="The group's object id (a GUID).")
def lookup_group(group_id: str) -> None:
    """Look up a group by id."""
    _run("lookup_group", {"group_id": group_id})


@action.command("add-user-to-group")
@click.option("--user-id", required=True, help="The user's object id (a GUID) or UPN.")
@click.option("--group-id", required=True, help="The group's object id (a GUID).")
def add_user_to_group(user_id: str, group_id: str) -> None:
    """Add a user to a group (`added`, or `already_member`)."""
    _run("add_user_to_group", {"user_id": user_id, "group_id": group_id})


@action.command("remove-member-from-group")
@click.option("--user-id", required=True, help="The member's object id (a GUID) or UPN.")
@click.option("--group-id", required=True, help="The group's object id (a GUID).")
def remove_member_from_group(user_id: str, group_id: str) -> None:
    """Remove a member from a group (`removed`, or `not_member`)."""
    _run("remove_member_from_group", {"user_id": user_id, "group_id": group_id})
