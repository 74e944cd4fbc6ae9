"""Starting flow runs: write the run and its steps, commit, then queue the chain of step tasks.

The order matters: a run on the queue always has its rows, and a run whose rows were committed
but never queued (a crash between the two) keeps `enqueued_at` empty, so it can be found again.
A run can also lose its message after it was queued: kombu's Redis transport takes a message off
the queue before it notes that the worker holds it, and a worker dying in between (SIGKILL, a
lost machine) takes the message with it, where no visibility timeout brings it back. An
unfinished run with no message of it waiting or held is queued again the same way.
Tasks are sent by name: the scheduler never imports the worker's code.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from celery import chain
from sqlmodel import Session, col, select

from entraflow import keys
from entraflow.catalogue import ACTIONS
from entraflow.celery_app import app
from entraflow.settings import Settings
from models.db import session_scope
from models.runs import FlowRun, RunStatus, StepRun, StepStatus, utcnow

# A run committed this long ago and still not queued is stranded: its starter died in between.
STRANDED_RUN_GRACE_S = 60.0
# Stranded runs re-queued per pass, so one pass stays short.
STRANDED_RUNS_PER_PASS = 100
# Work queued this long ago with no message of it waiting or held by a worker has lost its
# message. Work queued more recently is left to its first delivery.
LOST_MESSAGE_GRACE_S = 15.0
# The content type of every task message entraflow sends (see entraflow.celery_app).
JSON_CONTENT_TYPE = "application/json"


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
    settings: Settings,
    *,
    grace_s: float = STRANDED_RUN_GRACE_S,
    lost_grace_s: float = LOST_MESSAGE_GRACE_S,
) -> list[str]:
    """Queue the runs on no queue, never queued or having lost their message; return their ids."""
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
    stranded += lost_runs(settings, grace_s=lost_grace_s)
    # Queue first, mark after: a crash in between queues a chain twice, which steps shrug off.
    for run_id in stranded:
        enqueue_run(settings, run_id)
    return stranded


def lost_runs(settings: Settings, *, grace_s: float = LOST_MESSAGE_GRACE_S) -> list[str]:
    """Unfinished runs queued over `grace_s` ago whose step message is neither waiting nor held.

    A chain has one message at a time, and a step that ends either ends its run or sends the
    next message before its own is acknowledged: a run with no message at all has lost it.
    """
    cutoff = utcnow() - timedelta(seconds=grace_s)
    with session_scope(settings.resolved_database_url) as session:
        unfinished = session.exec(
            select(FlowRun.id)
            .where(col(FlowRun.status).in_([RunStatus.QUEUED, RunStatus.RUNNING]))
            .where(col(FlowRun.enqueued_at) < cutoff)
            .order_by(col(FlowRun.enqueued_at))
            .limit(STRANDED_RUNS_PER_PASS)
        ).all()
    if not unfinished:
        return []
    held = held_task_args(keys.FLOWS_QUEUE)
    if held is None:
        return []
    held_runs = {args[0] for args in held if args}
    return [run_id for run_id in unfinished if run_id not in held_runs]


def held_task_args(queue: str) -> list[tuple[str, ...]] | None:
    """The arguments, as text, of every task message workers hold unacknowledged.

    None while messages wait on `queue`: one of them may be the message looked for, and reading
    a long queue through is not worth it; once it has drained, what is not held is nowhere.
    """
    with app.connection_for_read() as connection:
        channel: Any = connection.default_channel
        if channel.queue_declare(queue=queue).message_count:
            return None
        with channel.conn_or_acquire() as client:
            held = client.hvals(channel.unacked_key)
    return [args for args in map(_task_args, held) if args is not None]


def _task_args(raw: bytes) -> tuple[str, ...] | None:
    """The arguments of a JSON task message as kombu's Redis transport holds it, or None."""
    try:
        # The message, its exchange and its routing key. Only JSON is read: never unpickle.
        message = json.loads(raw)[0]
        if message.get("content-type") != JSON_CONTENT_TYPE:
            return None
        body = message["body"]
        if message["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
    except (ValueError, LookupError, TypeError, AttributeError):
        return None  # not a task message of ours
    return tuple(str(arg) for arg in args) if isinstance(args, list) else None
