"""The audit log: every group-membership change entraflow made or was refused, and who caused it.

One row per membership write attempt that ended (a flow step, or one row of a bulk batch).
Callers record it in their own transaction, beside the result it belongs to, so a result and its
audit entry are committed together or not at all:

    record_membership_changes(session, [   # the caller's open session; nothing is committed here
      membership_change(
        action="add_user_to_group",     # or "remove_member_from_group"
        user_id="...", group_id="...",  # as asked (a user may be a UPN)
        outcome="added",                # added | already_member | removed | not_member | an error
                                        # outcome (not_found, forbidden, throttled, ...)
        actor=current_actor(session, client_id=settings.client_id,
                            tenant_id=settings.tenant_id),
        cause=FlowStep(run_id, step_id),  # or BatchRow(batch_id, row)
        event_source="hr/workday", event_id="...",   # the triggering event, if any
        request_id="...",                # Graph's request id of the last request, if any
        error_code=None, error_message=None,         # for a refused or failed change
      ),
      ...                               # a batch records a chunk's entries in one statement
    ])

`changed` is derived from the outcome: only `added` and `removed` changed the group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import insert
from sqlmodel import Field, Session, SQLModel, col, select

from models.connections import ACTIVE_CONNECTION_ID, Connection, ConnectionKind
from models.db import Timestamp, session_scope, utcnow

ADD_ACTION = "add_user_to_group"
REMOVE_ACTION = "remove_member_from_group"
MEMBERSHIP_ACTIONS = frozenset({ADD_ACTION, REMOVE_ACTION})
# The outcomes after which the group's membership is not what it was before.
CHANGING_OUTCOMES = frozenset({"added", "removed"})


class CauseKind(StrEnum):
    FLOW_RUN = "flow_run"
    BATCH = "batch"


@dataclass(frozen=True)
class FlowStep:
    """A membership change caused by one step of a flow run."""

    run_id: str
    step_id: str


@dataclass(frozen=True)
class BatchRow:
    """A membership change caused by one row of a bulk batch (rows counted from 1)."""

    batch_id: str
    row: int


@dataclass(frozen=True)
class Actor:
    """Whom Graph saw acting: the connection's kind, app, tenant and signed-in account."""

    kind: str
    app_id: str | None
    tenant_id: str | None
    # The signed-in (service) account's UPN; None for an app-only connection.
    account: str | None = None


class AuditEntry(SQLModel, table=True):
    """One membership change, or refused change, and everything needed to answer for it."""

    __tablename__ = "audit_entry"

    id: int | None = Field(default=None, primary_key=True)
    time: datetime = Field(default_factory=utcnow, index=True, sa_type=Timestamp)
    action: str
    user_id: str | None = Field(default=None, index=True)
    group_id: str | None = Field(default=None, index=True)
    outcome: str
    changed: bool
    connection_kind: str
    connection_app_id: str | None = None
    connection_tenant_id: str | None = None
    connection_account: str | None = None
    cause: CauseKind
    run_id: str | None = Field(default=None, index=True)
    step_id: str | None = None
    batch_id: str | None = Field(default=None, index=True)
    batch_row: int | None = None
    event_source: str | None = None
    event_id: str | None = None
    graph_request_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None


def current_actor(session: Session, *, client_id: str | None, tenant_id: str | None) -> Actor:
    """The stored connection as an actor, or else the app-only one the settings name."""
    # The same choice worker.tokens makes for the token it sends.
    stored = session.get(Connection, ACTIVE_CONNECTION_ID)
    if stored is None:
        return Actor(ConnectionKind.APP.value, client_id, tenant_id)
    account = stored.account_upn if stored.kind is ConnectionKind.DELEGATED else None
    return Actor(stored.kind.value, stored.client_id, stored.tenant_id, account)


def record_membership_changes(session: Session, changes: Sequence[dict[str, Any]]) -> None:
    """Add the entries `membership_change` built, in one statement; the caller commits."""
    if changes:
        session.execute(insert(AuditEntry), list(changes))


def membership_change(
    *,
    action: str,
    user_id: str | None,
    group_id: str | None,
    outcome: str,
    actor: Actor,
    cause: FlowStep | BatchRow,
    event_source: str | None = None,
    event_id: str | None = None,
    request_id: str | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """The audit entry of one change, as the values of its row (every row names every column)."""
    if action not in MEMBERSHIP_ACTIONS:
        raise ValueError(f"{action!r} is not a membership action")
    values: dict[str, Any] = {
        "time": at or utcnow(),
        "action": action,
        "user_id": user_id,
        "group_id": group_id,
        "outcome": outcome,
        "changed": outcome in CHANGING_OUTCOMES,
        "connection_kind": actor.kind,
        "connection_app_id": actor.app_id,
        "connection_tenant_id": actor.tenant_id,
        "connection_account": actor.account,
        "event_source": event_source,
        "event_id": event_id,
        "graph_request_id": request_id,
        "error_code": error_code,
        "error_message": error_message,
    }
    if isinstance(cause, FlowStep):
        values.update(cause=CauseKind.FLOW_RUN, run_id=cause.run_id, step_id=cause.step_id)
        values.update(batch_id=None, batch_row=None)
    else:
        values.update(cause=CauseKind.BATCH, batch_id=cause.batch_id, batch_row=cause.row)
        values.update(run_id=None, step_id=None)
    return values


def entry_view(entry: AuditEntry) -> dict[str, Any]:
    """An entry as `entraflow audit --json` prints it."""
    return {
        "id": entry.id,
        "time": entry.time,
        "action": entry.action,
        "user_id": entry.user_id,
        "group_id": entry.group_id,
        "outcome": entry.outcome,
        "changed": entry.changed,
        "connection": {
            "kind": entry.connection_kind,
            "app_id": entry.connection_app_id,
            "tenant_id": entry.connection_tenant_id,
            "account": entry.connection_account,
        },
        "cause": entry.cause.value,
        "run_id": entry.run_id,
        "step_id": entry.step_id,
        "batch_id": entry.batch_id,
        "batch_row": entry.batch_row,
        "event_source": entry.event_source,
        "event_id": entry.event_id,
        "graph_request_id": entry.graph_request_id,
        "error_code": entry.error_code,
        "error_message": entry.error_message,
    }


def list_audit_entries(
    database_url: str,
    *,
    limit: int,
    user_id: str | None = None,
    group_id: str | None = None,
    since: datetime | None = None,
    run_id: str | None = None,
    batch_id: str | None = None,
) -> list[dict[str, Any]]:
    """Entries newest first, filtered by any of user, group, time, run and batch."""
    query = select(AuditEntry)
    for column, value in (
        (AuditEntry.user_id, user_id),
        (AuditEntry.group_id, group_id),
        (AuditEntry.run_id, run_id),
        (AuditEntry.batch_id, batch_id),
    ):
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        query = query.where(col(AuditEntry.time) >= since)
    # The id breaks ties between entries of the same moment: the later insert first.
    query = query.order_by(col(AuditEntry.time).desc(), col(AuditEntry.id).desc()).limit(limit)
    with session_scope(database_url) as session:
        return [entry_view(entry) for entry in session.exec(query).all()]
