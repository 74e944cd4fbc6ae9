"""Starting flow runs: write the run and its steps, commit, then queue the chain of step tasks.

The order matters: a run on the queue always has its rows, and a run whose rows were committed
but never queued (a crash between the two) keeps `enqueued_at` empty, so it can be found again.
Tasks are sent by name: the scheduler never imports the worker's code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from celery import chain
from sqlmodel import Session, col, select

from entraflow.catalogue import ACTIONS
from entraflow.celery_app import app
from entraflow.settings import Settings
from models.db import session_scope
from models.runs import FlowRun, StepRun, StepStatus, utcnow

# A run committed this long ago and still not queued is stranded: its starter died in between.
STRANDED_RUN_GRACE_S = 60.0
# Stranded runs re-queued per pass, so one pass stays short.
STRANDED_RUNS_PER_PASS = 100


class FlowDefinitionError(ValueError):
    """Raised when a flow's steps cannot be turned into a run."""


def start_run(
    settings: Settings, flow_name: str, steps: Sequence[Mapping[str, Any]], event: Mapping[str, Any]
) -> str:
    """Record a run of `steps` for `event`, queue it, and return the run id."""
    run_id = create_run(settings, flow_name, steps, event)
    enqueue_run(settings, run_id)
    return run_id


def create_run(
    settings: Settings, flow_name: str, steps: Sequence[Mapping[str, Any]], event: Mapping[str, Any]
) -> str:
    """Write a queued run and its steps, and commit."""
    with session_scope(settings.resolved_database_url) as session:
        return add_run(session, flow_name, steps, event)


def add_run(
    session: Session, flow_name: str, steps: Sequence[Mapping[str, Any]], event: Mapping[str, Any]
) -> str:
    """Add a queued run and its steps to `session`, uncommitted, and return the run id."""
    if not steps:
        raise FlowDefinitionError(f"flow {flow_name!r} has no steps")
    for step in steps:
        action = step.get("action")
        if action not in ACTIONS:
            raise FlowDefinitionError(
                f"flow {flow_name!r}, step {step.get('id')!r}: unknown action {action!r}"
            )
    run = FlowRun(
        flow=flow_name,
        event_id=event.get("id"),
        event_source=event.get("source"),
        event=dict(event),
    )
    session.add(run)
    session.flush()
    for position, step in enumerate(steps):
        session.add(
            StepRun(
                run_id=run.id,
                position=position,
                step_id=str(step["id"]),
                action=str(step["action"]),
                templates=dict(step.get("with") or {}),
                condition=step.get("if"),
            )
        )
    session.flush()
    return run.id


def enqueue_run(settings: Settings, run_id: str) -> None:
    """Queue the chain of a committed run's steps not yet done, then mark the run as queued."""
    with session_scope(settings.resolved_database_url) as session:
        # A replayed run keeps the steps that succeeded: its chain starts at the failed one.
        steps = session.exec(
            select(StepRun)
            .where(StepRun.run_id == run_id)
            .where(col(StepRun.status).not_in([StepStatus.SUCCEEDED, StepStatus.SKIPPED]))
            .order_by(col(StepRun.position))
        ).all()
        signatures = [
            app.signature(
                ACTIONS[step.action].task_name,
                args=(run_id, step.step_id),
                immutable=True,
                # Flower shows this instead of a bare tuple: which run and step, by name.
                argsrepr=f"run_id={run_id!r}, step_id={step.step_id!r}",
            )
            for step in steps
        ]
        chain(*signatures).apply_async()
        run = session.get(FlowRun, run_id)
        if run is not None:
            run.enqueued_at = utcnow()


def unqueued_runs(session: Session, run_ids: Sequence[str]) -> list[str]:
    """Those of `run_ids` whose chain was never queued."""
    if not run_ids:
        return []
    return list(
        session.exec(
            select(FlowRun.id)
            .where(col(FlowRun.id).in_(run_ids))
            .where(col(FlowRun.enqueued_at).is_(None))
        ).all()
    )


def enqueue_stranded_runs(
    settings: Settings, *, grace_s: float = STRANDED_RUN_GRACE_S
) -> list[str]:
    """Queue the runs committed more than `grace_s` ago and never queued; return their ids."""
    cutoff = utcnow() - timedelta(seconds=grace_s)
    with session_scope(settings.resolved_database_url) as session:
        stranded = list(
            session.exec(
                select(FlowRun.id)
                .where(col(FlowRun.enqueued_at).is_(None))
                .where(col(FlowRun.created_at) < cutoff)
                .order_by(col(FlowRun.created_at))
                .limit(STRANDED_RUNS_PER_PASS)
            ).all()
        )
    # Queue first, mark after: a crash in between queues a chain twice, which steps shrug off.
    for run_id in stranded:
        enqueue_run(settings, run_id)
    return stranded
