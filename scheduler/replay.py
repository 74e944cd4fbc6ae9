"""Replaying failed runs from the step that failed, keeping what the steps before it did."""

from __future__ import annotations

from sqlmodel import col, select

from entraflow.settings import Settings
from models.db import session_scope
from models.runs import FlowRun, RunStatus, StepRun, StepStatus
from scheduler.runs import enqueue_run

# Runs replayed by one `runs replay --status failed` at most, so a mistake stays small.
MAX_REPLAYS_PER_CALL = 1000


class ReplayError(ValueError):
    """Raised when a run cannot be replayed: unknown, or not failed."""


def replay_run(settings: Settings, run_id: str) -> str:
    """Queue a failed run again from its failed step; return the id of that step."""
    with session_scope(settings.resolved_database_url) as session:
        run = session.get(FlowRun, run_id)
        if run is None:
            raise ReplayError(f"no run {run_id!r}")
        if run.status != RunStatus.FAILED:
            raise ReplayError(f"run {run_id} is {run.status}; only a failed run can be replayed")
        steps = session.exec(
            select(StepRun).where(StepRun.run_id == run_id).order_by(col(StepRun.position))
        ).all()
        failed = next((step for step in steps if step.status == StepStatus.FAILED), None)
        if failed is None:
            raise ReplayError(f"run {run_id} failed before any step did; it has nothing to replay")
        for step in steps[failed.position :]:
            step.status = StepStatus.QUEUED
            # The delivery count restarts: the replay is a new decision by a person.
            step.attempts = 0
            step.inputs = step.output = step.error = None
            step.graph_request_id = None
            step.started_at = step.finished_at = None
        run.status = RunStatus.QUEUED
        run.error = None
        run.finished_at = None
        run.enqueued_at = None
        failed_step_id = failed.step_id
    enqueue_run(settings, run_id)
    return failed_step_id


def failed_run_ids(settings: Settings, *, flow: str | None = None) -> list[str]:
    """The failed runs, oldest first, optionally of one flow."""
    query = select(FlowRun.id).where(FlowRun.status == RunStatus.FAILED)
    if flow is not None:
        query = query.where(FlowRun.flow == flow)
    with session_scope(settings.resolved_database_url) as session:
        return list(
            session.exec(query.order_by(col(FlowRun.created_at)).limit(MAX_REPLAYS_PER_CALL)).all()
        )
