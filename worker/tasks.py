"""The Celery tasks of flow steps: one per catalogue action, thin adapters around `worker.steps`.

A task message carries a run id and a step id, nothing else: inputs are read from the run
history and rendered here, and credentials never leave the worker.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.signals import worker_process_init
from redis.backoff import ExponentialBackoff
from redis.retry import Retry as RedisRetry
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from entraflow import metrics
from entraflow.catalogue import ACTIONS
from entraflow.celery_app import (
    DELIVERY_OUTCOMES,
    STORAGE_ERRORS,
    EntraflowTask,
    app,
    task_soft_time_limit_s,
)
from entraflow.redis_server import redis_url
from entraflow.settings import get_settings
from models.db import forget_engines, is_transient_database_error, session_scope
from models.runs import FINAL_RUN_STATUSES, FlowRun
from worker.actions import ActionResult, run_action
from worker.graph import GraphClient
from worker.steps import DuplicateDelivery, RetryLater, StepFailed, execute_step, fail_step

log = logging.getLogger(__name__)

# Step locks and the Graph budget wait this long for a Redis that went away (a restart) before
# the step gives up: a lock it could not release would hold the step up for its whole lease.
REDIS_PATIENCE_S = 30.0
# The longest wait between two tries of a Redis command; the first is a tenth of a second.
REDIS_RETRY_MAX_INTERVAL_S = 1.0
REDIS_RETRY_FIRST_INTERVAL_S = 0.1


@lru_cache(maxsize=1)
def graph_client() -> GraphClient:
    """This process's Graph client; its token is cached across tasks."""
    # Flow steps are interactive work: they take from the shared budget at normal priority.
    return GraphClient.from_settings(get_settings(), budget_redis=lock_client())


@lru_cache(maxsize=1)
def lock_client() -> redis.Redis:
    """This process's connection to the Redis that holds step locks and the Graph budget."""
    return redis.Redis.from_url(redis_url(get_settings()), retry=patient_redis_retry())


def patient_redis_retry() -> RedisRetry:
    """Reconnect and try a command again for about `REDIS_PATIENCE_S` while Redis is away."""
    # Half the first interval: the backoff doubles it before the first wait.
    backoff = ExponentialBackoff(
        cap=REDIS_RETRY_MAX_INTERVAL_S, base=REDIS_RETRY_FIRST_INTERVAL_S / 2
    )
    return RedisRetry(backoff, round(REDIS_PATIENCE_S / REDIS_RETRY_MAX_INTERVAL_S))


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    # A forked child must not share the parent's database or Redis sockets.
    forget_engines()
    graph_client.cache_clear()
    lock_client.cache_clear()


def perform(action: str, inputs: dict[str, Any]) -> ActionResult:
    """Run one Entra action against Graph now."""
    return run_action(graph_client(), action, inputs)


class WorkerTask(EntraflowTask):
    """A task of the worker, which knows the database: it waits out only what passes with time."""

    def waits_on(self, exc: Exception) -> bool:
        # A value the database refuses (an index row too large) fails now, not at every retry.
        return not isinstance(exc, SQLAlchemyError) or is_transient_database_error(exc)


class StepTask(WorkerTask):
    """The task of one action: a delivery executes one step of a flow run."""

    action: str
    id_args = ("run_id", "step_id")
    # A step that must wait (a long Graph wait, a busy lock) goes back to the queue.
    waits_for = (RetryLater, *STORAGE_ERRORS)
    delivery_outcomes = ((StepFailed, "failed"), *DELIVERY_OUTCOMES)
    # Retries are bounded by the step's time budget in worker.steps, not by a count.
    max_retries = None

    def countdown_s(self, exc: Exception) -> float:
        if isinstance(exc, RetryLater):
            return exc.countdown_s
        return super().countdown_s(exc)

    def observe(self, outcome: str, duration_s: float) -> None:
        metrics.STEP_DURATION.labels(self.action, outcome).observe(duration_s)

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        run_id, step_id = args
        with self.log_context(args):
            if isinstance(exc, StepFailed):
                log.warning("%s", exc)
            else:
                log.error("task %s crashed: %r", task_id, exc)
                message = f"internal error: {type(exc).__name__}: {exc}"
                fail_step(get_settings(), run_id, step_id, message)
            count_run_if_ended(run_id)


def run_step(self: StepTask, run_id: str, step_id: str) -> dict[str, str]:
    """Execute one step of a flow run, its action the task's."""
    try:
        status = execute_step(get_settings(), lock_client(), run_id, step_id, self.action, perform)
    except DuplicateDelivery as exc:
        log.info("ignored a duplicate delivery: %s", exc)
        raise Ignore() from exc
    except SoftTimeLimitExceeded as exc:
        # Celery stopped the step: record it failed, with the limit, so that its run ends
        # instead of the step being delivered again until its delivery cap.
        limit_s = task_soft_time_limit_s(get_settings())
        message = f"stopped by the task time limit of {limit_s:g} s"
        fail_step(get_settings(), run_id, step_id, message)
        raise StepFailed(run_id, step_id, {"outcome": "failed", "message": message}) from exc
    return {"run_id": run_id, "step_id": step_id, "status": status}


def count_run_if_ended(run_id: str) -> None:
    """Count the run in the runs metric if it has ended: the step that failed ended it.

    A run that succeeded is counted as its last step is recorded (worker.steps).
    """
    try:
        with session_scope(get_settings().resolved_database_url) as session:
            run = session.get(FlowRun, run_id)
            if run is not None and run.status in FINAL_RUN_STATUSES:
                metrics.RUNS.labels(run.flow, run.status).inc()
    except OperationalError as exc:
        # The step is recorded: a lost count is better than running it again.
        log.warning("run %s not counted: %s", run_id, exc)


# The task of each action in the catalogue, by action name.
STEP_TASKS: dict[str, Task] = {
    spec.name: app.task(run_step, name=spec.task_name, base=StepTask, bind=True, action=spec.name)
    for spec in ACTIONS.values()
}
