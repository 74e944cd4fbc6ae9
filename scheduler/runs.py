"""Starting flow runs: write the run and its steps, commit, then queue the chain of step tasks.

The order matters: a run on the queue always has its rows, and a run whose rows were committed
but never queued (a crash between the two) keeps `enqueued_at` empty, so it can be found again.
Tasks are sent by name: the scheduler never imports the worker's code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from celery import chain
from sqlmodel import select

from entraflow.catalogue import ACTIONS
from entraflow.celery_app import app
from entraflow.settings import Settings
from models.db import session_scope
from models.runs import FlowRun, StepRun, utcnow


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
    with session_scope(settings.resolved_database_url) as session:
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
    return run.id


def enqueue_run(settings: Settings, run_id: str) -> None:
    """Queue the chain of a committed run's steps, then mark the run as queued."""
    with session_scope(settings.resolved_database_url) as session:
        steps = session.exec(
            select(StepRun).where(StepRun.run_id == run_id).order_by(StepRun.position)  # type: ignore[arg-type]
        ).all()
        signatures = [
            app.signature(
                ACTIONS[step.action].task_name, args=(run_id, step.step_id), immutable=True
            )
            for step in steps
        ]
        chain(*signatures).apply_async()
        run = session.get(FlowRun, run_id)
        if run is not None:
            run.enqueued_at = utcnow()
