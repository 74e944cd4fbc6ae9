"""Executing one step of a flow run: claim it, fill in its inputs, run its action, record it.

This is the logic behind every step task, written without Celery so it can be tested as plain
calls. The task turns the outcomes below into Celery's words: a return continues the chain,
`DuplicateDelivery` is ignored, `RetryLater` goes back to the queue, `StepFailed` ends the chain.

Delivery is at least once (late acknowledgement, redelivery after a crash), so a step must be
safe to receive twice: a step lock keeps two deliveries from running it at the same time, and
every write to the step row names the attempt it belongs to, so a delivery that lost its claim
cannot record anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import update
from sqlmodel import Session, col, select

from entraflow import keys, metrics
from entraflow.settings import Settings
from entraflow.templating import TemplateProblem, evaluate_condition, render_inputs
from models.audit import (
    MEMBERSHIP_ACTIONS,
    FlowStep,
    current_actor,
    membership_change,
    record_membership_changes,
)
from models.db import session_scope
from models.runs import FINAL_STEP_STATUSES, FlowRun, RunStatus, StepRun, StepStatus, utcnow
from worker.actions import ActionResult
from worker.errors import EntraflowError, GraphError, SharedLimitError, TransientGraphError

log = logging.getLogger(__name__)

# A delivery that found the step locked by another one looks again within these bounds.
BUSY_RECHECK_MIN_S = 1.0
BUSY_RECHECK_MAX_S = 10.0
# Input names whose values never reach the run history in clear text.
SECRET_INPUT_MARKERS = ("secret", "password", "token", "credential")
REDACTED = "[redacted]"

Perform = Callable[[str, dict[str, Any]], ActionResult]
# Written in the transaction that records a step's end, after its claim is checked.
Audit = Callable[[Session], None]


class DuplicateDelivery(Exception):
    """Raised when a delivery finds its step already dealt with and the chain already past it."""


class RetryLater(Exception):
    """Raised when the step must run again after `countdown_s` (a long Graph wait, a busy lock)."""

    def __init__(self, countdown_s: float, reason: str) -> None:
        # Every constructor argument goes to `args`, so Celery can serialise the exception.
        super().__init__(countdown_s, reason)
        self.countdown_s = countdown_s
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class StepFailed(Exception):
    """Raised when the step ended in failure; the run is failed and the chain stops."""

    def __init__(self, run_id: str, step_id: str, error: Mapping[str, Any]) -> None:
        super().__init__(run_id, step_id, dict(error))
        self.run_id = run_id
        self.step_id = step_id
        self.error = dict(error)

    def __str__(self) -> str:
        return f"run {self.run_id}, step {self.step_id}: {self.error.get('message')}"


@dataclass(frozen=True)
class StepContext:
    """What a claimed step needs to run."""

    run_id: str
    step_id: str
    action: str
    attempt: int
    templates: dict[str, Any]
    condition: str | None
    started_at: datetime
    event: dict[str, Any]
    earlier_outputs: dict[str, Any]
    # Whether this is the run's last step: its end ends the run.
    is_last: bool
    # Recorded by a delivery that died before queuing the next step: only forward the chain.
    already_done: StepStatus | None = None


def execute_step(
    settings: Settings,
    redis_client: redis.Redis,
    run_id: str,
    step_id: str,
    action: str,
    perform: Perform,
) -> str:
    """Run one delivery of a step and return the status it ended in.

    The step's lock is leased for the visibility timeout: a live delivery ends within it (or the
    broker would hand its message to another worker anyway), and a dead worker's message comes
    back after it, when the lock has lapsed too. A delivery that outlives its lease cannot record
    its result (see the attempt check).
    """
    lock = redis_client.lock(keys.step_lock(run_id, step_id), timeout=settings.visibility_timeout_s)
    if not lock.acquire(blocking=False):
        remaining_ms = redis_client.pttl(keys.step_lock(run_id, step_id))
        countdown_s = min(max(remaining_ms / 1000, BUSY_RECHECK_MIN_S), BUSY_RECHECK_MAX_S)
        raise RetryLater(countdown_s, "another delivery is executing this step")
    try:
        context = _claim(settings, run_id, step_id, action)
        return _run_claimed(settings, context, perform)
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            log.warning("step %s/%s outlived its lease", run_id, step_id)
        except redis.RedisError as exc:
            # What the step did is recorded; the lock lapses with its lease.
            log.warning("step %s/%s lock not released: %s", run_id, step_id, exc)


def _claim(settings: Settings, run_id: str, step_id: str, action: str) -> StepContext:
    url = settings.resolved_database_url
    with session_scope(url) as session:
        # Every step of the run in one read: this one, the outputs before it, the one after.
        steps = _load_steps(session, run_id)
        step = _one_step(steps, run_id, step_id)
        if step.action != action:
            raise StepFailed(
                run_id,
                step_id,
                {"outcome": "failed", "message": f"step is {step.action!r}, message is {action!r}"},
            )
        if step.status in (StepStatus.SUCCEEDED, StepStatus.SKIPPED):
            if _next_step_waiting(steps, step):
                # The crash came after recording this step and before queuing the next one.
                return _context(
                    session, step, steps, attempt=step.attempts, already_done=step.status
                )
            raise DuplicateDelivery(f"run {run_id}, step {step_id} is already {step.status}")
        if step.status == StepStatus.FAILED:
            raise DuplicateDelivery(f"run {run_id}, step {step_id} already failed")
        if step.attempts >= settings.max_step_deliveries:
            error = {
                "outcome": "failed",
                "message": f"delivered {step.attempts} times without finishing; "
                "a worker may be dying on it",
            }
            _finish(session, step, StepStatus.FAILED, error=error)
            session.commit()  # before raising: the scope rolls back on the way out
            raise StepFailed(run_id, step_id, error)
        now = utcnow()
        step.attempts += 1
        step.status = StepStatus.RUNNING
        step.started_at = step.started_at or now
        run = session.get(FlowRun, run_id)
        if run is not None and run.status == RunStatus.QUEUED:
            run.status = RunStatus.RUNNING
            run.started_at = now
        session.flush()
        return _context(session, step, steps, attempt=step.attempts)


def _run_claimed(settings: Settings, context: StepContext, perform: Perform) -> str:
    url = settings.resolved_database_url
    if context.already_done is not None:
        return context.already_done
    variables = {"event": context.event, "steps": context.earlier_outputs}
    try:
        if context.condition and not evaluate_condition(context.condition, variables):
            _record(url, context, StepStatus.SKIPPED)
            return StepStatus.SKIPPED
        inputs = render_inputs(context.templates, variables)
    except TemplateProblem as exc:
        error = {"outcome": "invalid_input", "message": str(exc)}
        _record(url, context, StepStatus.FAILED, error=error)
        raise StepFailed(context.run_id, context.step_id, error) from exc
    # Inputs are written with the step's outcome: one transaction fewer per step.
    recorded_inputs = redact(inputs)
    try:
        result = perform(context.action, inputs)
    except SharedLimitError as exc:
        # Waiting for our own share of Graph (its budget, a group's write slots) is no failure
        # of Graph's: it spends neither the step's retry time nor its delivery cap (a batch
        # chunk releases its attempt the same way). A backlog longer than the budget allows in
        # that time must wait, not fail.
        _record(url, context, StepStatus.RETRYING, inputs=recorded_inputs, waited=True)
        raise RetryLater(exc.retry_after_s or settings.max_inprocess_wait_s, str(exc)) from exc
    except TransientGraphError as exc:
        countdown_s = exc.retry_after_s or settings.max_inprocess_wait_s
        elapsed_s = (utcnow() - context.started_at).total_seconds()
        # A delivery that spent its in-process attempts goes back to the queue: the step's time
        # budget (and the delivery cap) end it, not one unlucky run of 429s.
        if elapsed_s + countdown_s > settings.max_graph_retry_time_s:
            error = _error_of(exc)
            error["message"] = f"gave up after {elapsed_s:.0f} s: {error['message']}"
            audit = _audit(settings, context, inputs, error["outcome"], exc.request_id, error)
            _record(
                url,
                context,
                StepStatus.FAILED,
                inputs=recorded_inputs,
                error=error,
                request_id=exc.request_id,
                audit=audit,
            )
            raise StepFailed(context.run_id, context.step_id, error) from exc
        _record(url, context, StepStatus.RETRYING, inputs=recorded_inputs, error=_error_of(exc))
        raise RetryLater(countdown_s, str(exc)) from exc
    except EntraflowError as exc:
        error = _error_of(exc)
        request_id = exc.request_id if isinstance(exc, GraphError) else None
        audit = _audit(settings, context, inputs, error["outcome"], request_id, error)
        _record(
            url,
            context,
            StepStatus.FAILED,
            inputs=recorded_inputs,
            error=error,
            request_id=request_id,
            audit=audit,
        )
        raise StepFailed(context.run_id, context.step_id, error) from exc
    outcome = str(result.output.get("outcome"))
    _record(
        url,
        context,
        StepStatus.SUCCEEDED,
        inputs=recorded_inputs,
        output=result.output,
        request_id=result.request_id,
        audit=_audit(settings, context, inputs, outcome, result.request_id),
    )
    return StepStatus.SUCCEEDED


def _audit(
    settings: Settings,
    context: StepContext,
    inputs: Mapping[str, Any],
    outcome: str,
    request_id: str | None,
    error: Mapping[str, Any] | None = None,
) -> Audit | None:
    """The audit entry of a membership step that ended, to write with its result; else None."""
    if context.action not in MEMBERSHIP_ACTIONS:
        return None

    def record(session: Session) -> None:
        record_membership_changes(
            session,
            [
                membership_change(
                    action=context.action,
                    user_id=_text_or_none(inputs.get("user_id")),
                    group_id=_text_or_none(inputs.get("group_id")),
                    outcome=outcome,
                    actor=current_actor(
                        session, client_id=settings.client_id, tenant_id=settings.tenant_id
                    ),
                    cause=FlowStep(context.run_id, context.step_id),
                    event_source=_text_or_none(context.event.get("source")),
                    event_id=_text_or_none(context.event.get("id")),
                    request_id=request_id,
                    error_code=_text_or_none(error.get("code")) if error else None,
                    error_message=_text_or_none(error.get("message")) if error else None,
                )
            ],
        )

    return record


def _text_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def fail_step(settings: Settings, run_id: str, step_id: str, message: str) -> None:
    """Mark a step and its run failed whatever its state: its task crashed unexpectedly."""
    with session_scope(settings.resolved_database_url) as session:
        step = _load_step(session, run_id, step_id)
        if step.status not in FINAL_STEP_STATUSES:
            _finish(
                session, step, StepStatus.FAILED, error={"outcome": "failed", "message": message}
            )


def _record(
    database_url: str,
    context: StepContext,
    status: StepStatus,
    *,
    inputs: dict[str, Any] | None = None,
    output: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    request_id: str | None = None,
    audit: Audit | None = None,
    waited: bool = False,
) -> None:
    """Write the step's new state (and its audit entry), only if this delivery holds the claim.

    `waited`: the delivery only waited for the Graph budget; it gives its attempt back, and the
    step's time budget starts again at the next delivery.
    """
    values: dict[str, Any] = {"status": status}
    if waited:
        values["attempts"] = context.attempt - 1
        values["started_at"] = None
    if inputs is not None:
        values["inputs"] = inputs
    if output is not None:
        values["output"] = output
    if error is not None or status == StepStatus.SUCCEEDED:
        values["error"] = error
    if request_id is not None:
        values["graph_request_id"] = request_id
    final = status in (StepStatus.SUCCEEDED, StepStatus.SKIPPED, StepStatus.FAILED)
    if final:
        values["finished_at"] = utcnow()
    with session_scope(database_url) as session:
        claimed = session.execute(
            update(StepRun)
            .where(col(StepRun.run_id) == context.run_id)
            .where(col(StepRun.step_id) == context.step_id)
            .where(col(StepRun.attempts) == context.attempt)
            .where(col(StepRun.status).in_([StepStatus.RUNNING, StepStatus.RETRYING]))
            .values(**values)
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            raise DuplicateDelivery(
                f"run {context.run_id}, step {context.step_id}: attempt {context.attempt} "
                "lost its claim to a later delivery"
            )
        if audit is not None:
            # In the claim's transaction: a delivery that lost its claim audits nothing.
            audit(session)
        ended = None
        # A step that succeeded or was skipped, and is not the last, leaves its run as it is.
        if status == StepStatus.FAILED or (final and context.is_last):
            ended = _settle_run(
                session, context.run_id, context.step_id, status, error, is_last=context.is_last
            )
    # A run that succeeded is counted here, once it is recorded; a failed one by its task's
    # failure handler, which every failure reaches.
    if ended is not None and ended.status == RunStatus.SUCCEEDED:
        metrics.RUNS.labels(ended.flow, ended.status).inc()


def _finish(session: Session, step: StepRun, status: StepStatus, *, error: dict[str, Any]) -> None:
    step.status = status
    step.error = error
    step.finished_at = utcnow()
    session.flush()
    _settle_run(session, step.run_id, step.step_id, status, error)


def _settle_run(
    session: Session,
    run_id: str,
    step_id: str,
    status: StepStatus,
    error: Mapping[str, Any] | None,
    *,
    is_last: bool | None = None,
) -> FlowRun | None:
    """Bring the run's status in line with a step that just ended; the run if that ended it.

    `is_last`: whether the step is the run's last, if the caller knows.
    """
    run = session.get(FlowRun, run_id)
    if run is None:
        return None
    if status == StepStatus.FAILED:
        run.status = RunStatus.FAILED
        run.error = f"step {step_id}: {(error or {}).get('message', 'failed')}"
        run.finished_at = utcnow()
        return run
    if is_last is None:
        last = session.exec(
            select(StepRun.step_id)
            .where(StepRun.run_id == run_id)
            .order_by(col(StepRun.position).desc())
            .limit(1)
        ).one()
        is_last = last == step_id
    if not is_last:
        return None
    run.status = RunStatus.SUCCEEDED
    run.finished_at = utcnow()
    return run


def _load_step(session: Session, run_id: str, step_id: str) -> StepRun:
    step = session.exec(
        select(StepRun).where(StepRun.run_id == run_id).where(StepRun.step_id == step_id)
    ).one_or_none()
    if step is None:
        raise StepFailed(
            run_id, step_id, {"outcome": "failed", "message": "no such step in the run history"}
        )
    return step


def _load_steps(session: Session, run_id: str) -> list[StepRun]:
    return list(session.exec(select(StepRun).where(StepRun.run_id == run_id)).all())


def _one_step(steps: list[StepRun], run_id: str, step_id: str) -> StepRun:
    for step in steps:
        if step.step_id == step_id:
            return step
    raise StepFailed(
        run_id, step_id, {"outcome": "failed", "message": "no such step in the run history"}
    )


def _next_step_waiting(steps: list[StepRun], step: StepRun) -> bool:
    following = [other for other in steps if other.position == step.position + 1]
    return bool(following) and following[0].status == StepStatus.QUEUED


def _context(
    session: Session,
    step: StepRun,
    steps: list[StepRun],
    *,
    attempt: int,
    already_done: StepStatus | None = None,
) -> StepContext:
    run = session.get(FlowRun, step.run_id)
    return StepContext(
        run_id=step.run_id,
        step_id=step.step_id,
        action=step.action,
        attempt=attempt,
        templates=dict(step.templates),
        condition=step.condition,
        started_at=step.started_at or utcnow(),
        event=dict(run.event) if run is not None else {},
        earlier_outputs={
            other.step_id: dict(other.output or {})
            for other in steps
            if other.position < step.position
        },
        is_last=all(other.position <= step.position for other in steps),
        already_done=already_done,
    )


def _error_of(exc: EntraflowError) -> dict[str, Any]:
    if isinstance(exc, GraphError):
        return exc.to_dict()
    return {"outcome": getattr(exc, "outcome", "invalid_input"), "message": str(exc)}


def redact(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Inputs fit for the run history: values of secret-looking names replaced."""
    return {
        name: REDACTED if any(m in name.lower() for m in SECRET_INPUT_MARKERS) else value
        for name, value in inputs.items()
    }
