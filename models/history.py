"""The run history: the views `runs list` and `runs show` print, and pruning old runs."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func
from sqlmodel import Session, col, select

from models.db import session_scope, utcnow
from models.flows import AcceptedEvent
from models.runs import FINAL_RUN_STATUSES, FlowRun, RunStatus, StepRun

# Rows deleted per transaction: short transactions keep workers' writes flowing meanwhile.
PRUNE_ROWS_PER_TRANSACTION = 500


def run_summary(run: FlowRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "flow": run.flow,
        "status": run.status,
        "event_id": run.event_id,
        "created_at": run.created_at,
        "finished_at": run.finished_at,
        "error": run.error,
    }


def step_view(step: StepRun) -> dict[str, Any]:
    return {
        "id": step.step_id,
        "action": step.action,
        "status": step.status,
        "attempts": step.attempts,
        "inputs": step.inputs,
        "output": step.output,
        "error": step.error,
        "graph_request_id": step.graph_request_id,
        "started_at": step.started_at,
        "finished_at": step.finished_at,
    }


def list_runs(
    database_url: str,
    *,
    limit: int,
    flow: str | None = None,
    status: RunStatus | None = None,
    since: datetime | None = None,
) -> list[dict[str, Any]]:
    """The newest runs first, optionally of one flow, in one status, or created since a time."""
    query = select(FlowRun)
    if flow is not None:
        query = query.where(FlowRun.flow == flow)
    if status is not None:
        query = query.where(FlowRun.status == status)
    if since is not None:
        query = query.where(col(FlowRun.created_at) >= since)
    with session_scope(database_url) as session:
        runs = session.exec(query.order_by(col(FlowRun.created_at).desc()).limit(limit)).all()
        return [run_summary(run) for run in runs]


def show_run(database_url: str, run_id: str) -> dict[str, Any] | None:
    """One run with its steps in order, or None."""
    with session_scope(database_url) as session:
        run = session.get(FlowRun, run_id)
        if run is None:
            return None
        steps = session.exec(
            select(StepRun).where(StepRun.run_id == run_id).order_by(col(StepRun.position))
        ).all()
        return {**run_summary(run), "steps": [step_view(step) for step in steps]}


def wait_for_run(
    database_url: str, run_id: str, *, timeout_s: float, poll_s: float = 0.05
) -> dict[str, Any]:
    """The run once it has succeeded or failed; TimeoutError if it has not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = show_run(database_url, run_id)
        if run is not None and run["status"] in FINAL_RUN_STATUSES:
            return run
        if time.monotonic() > deadline:
            status = run["status"] if run else "missing"
            raise TimeoutError(f"run {run_id} is still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def wait_for_event_runs(
    database_url: str, source: str, event_id: str, *, timeout_s: float, poll_s: float = 0.05
) -> list[dict[str, Any]]:
    """The runs an event produced, once the scheduler accepted it and every run has ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        with session_scope(database_url) as session:
            accepted = session.exec(
                select(AcceptedEvent)
                .where(AcceptedEvent.source == source)
                .where(AcceptedEvent.event_id == event_id)
            ).one_or_none()
            run_ids = list(accepted.run_ids) if accepted is not None else None
        if run_ids is not None:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"event {source}/{event_id} was not accepted in {timeout_s:.0f} s")
        time.sleep(poll_s)
    remaining_s = max(deadline - time.monotonic(), 0.0)
    return [
        wait_for_run(database_url, run_id, timeout_s=remaining_s, poll_s=poll_s)
        for run_id in run_ids
    ]


@dataclass(frozen=True)
class Pruned:
    """What a prune removed, or would remove on a dry run."""

    runs: int
    steps: int
    accepted_events: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def prune_history(
    database_url: str, cutoff: datetime, *, events_min_keep: timedelta, dry_run: bool = False
) -> Pruned:
    """Delete runs that ended before `cutoff` with their steps, never one queued or running."""
    # An accepted event is what makes a redelivered one a duplicate: it outlives its runs.
    events_before = min(cutoff, utcnow() - events_min_keep)
    old_events = select(AcceptedEvent.id).where(col(AcceptedEvent.accepted_at) < events_before)
    if dry_run:
        with session_scope(database_url) as session:
            old_runs = select(FlowRun.id).where(*_ended_before(cutoff))
            return Pruned(
                runs=_count(session, old_runs),
                steps=_count(session, select(StepRun.id).where(col(StepRun.run_id).in_(old_runs))),
                accepted_events=_count(session, old_events),
            )
    runs = steps = events = 0
    while True:
        with session_scope(database_url) as session:
            # Locked (on PostgreSQL) so a replay cannot restart a run between the two deletes;
            # the deletes check the status again for SQLite, which has no row locks.
            chosen = session.exec(
                select(FlowRun.id)
                .where(*_ended_before(cutoff))
                .limit(PRUNE_ROWS_PER_TRANSACTION)
                .with_for_update(skip_locked=True)
            ).all()
            if not chosen:
                break
            still_ended = (col(FlowRun.id).in_(chosen), *_ended_before(cutoff))
            steps += _deleted(
                session,
                delete(StepRun).where(
                    col(StepRun.run_id).in_(select(FlowRun.id).where(*still_ended))
                ),
            )
            runs += _deleted(session, delete(FlowRun).where(*still_ended))
    while True:
        with session_scope(database_url) as session:
            batch = old_events.limit(PRUNE_ROWS_PER_TRANSACTION).scalar_subquery()
            deleted = _deleted(
                session, delete(AcceptedEvent).where(col(AcceptedEvent.id).in_(batch))
            )
        events += deleted
        if not deleted:
            break
    return Pruned(runs=runs, steps=steps, accepted_events=events)


def _ended_before(cutoff: datetime) -> tuple[Any, ...]:
    # A run ends after it is created: the indexed created_at narrows the search cheaply.
    return (
        col(FlowRun.status).in_(FINAL_RUN_STATUSES),
        col(FlowRun.created_at) < cutoff,
        func.coalesce(col(FlowRun.finished_at), col(FlowRun.created_at)) < cutoff,
    )


def _count(session: Session, query: Any) -> int:
    return session.exec(select(func.count()).select_from(query.subquery())).one()


def _deleted(session: Session, statement: Any) -> int:
    return int(session.execute(statement).rowcount)  # type: ignore[attr-defined]
