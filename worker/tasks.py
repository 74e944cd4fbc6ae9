"""The Celery tasks: one per Entra action, each a thin adapter around `worker.steps`.

A task message carries a run id and a step id, nothing else: inputs are read from the run
history and rendered here, and credentials never leave the worker.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore, Retry, SoftTimeLimitExceeded
from celery.signals import worker_process_init
from redis.backoff import ExponentialBackoff
from redis.retry import Retry as RedisRetry
from sqlalchemy.exc import OperationalError

from entraflow import logs, metrics
from entraflow.catalogue import ACTIONS
from entraflow.celery_app import (
    EntraflowTask,
    app,
    max_retry_countdown_s,
    task_soft_time_limit_s,
)
from entraflow.redis_server import redis_url
from entraflow.settings import get_settings
from models.db import forget_engines, session_scope
from models.runs import FlowRun, RunStatus
from worker.actions import ActionResult, run_action
from worker.graph import GraphClient
from worker.steps import DuplicateDelivery, RetryLater, StepFailed, execute_step, fail_step

log = logging.getLogger(__name__)

# How long a step waits before trying again when the database or Redis does not answer.
STORAGE_RETRY_S = 5.0
# Step locks and the Graph budget wait this long for a Redis that went away (a restart) before
# the step gives up: a lock it could not release would hold the step up for its whole lease.
REDIS_PATIENCE_S = 30.0
# The longest wait between two tries of a Redis command; the first is a tenth of a second.
REDIS_RETRY_MAX_INTERVAL_S = 1.0
REDIS_RETRY_FIRST_INTERVAL_S = 0.1
FINAL_RUN_STATUSES = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED})
# The status label of a step delivery that did not end in a step status.
DELIVERY_OUTCOMES: tuple[tuple[type[BaseException], str], ...] = (
    (Retry, "retrying"),
    (Ignore, "duplicate"),
    (StepFailed, "failed"),
)
CRASHED = "crashed"


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


class StepTask(EntraflowTask):
    """A task that executes one step of a flow run; `action` names the Entra action."""

    abstract = True
    action: str
    # Retries are bounded by the step's time budget in worker.steps, not by a count.
    max_retries = None

    def run_step(self, run_id: str, step_id: str) -> dict[str, str]:
        try:
            status = execute_step(
                get_settings(), lock_client(), run_id, step_id, self.action, perform
            )
        except DuplicateDelivery as exc:
            log.info("ignored a duplicate delivery: %s", exc)
            raise Ignore() from exc
        except RetryLater as exc:
            countdown_s = min(exc.countdown_s, max_retry_countdown_s(get_settings()))
            log.info("step %s/%s retries in %.1f s: %s", run_id, step_id, countdown_s, exc)
            raise self.retry(countdown=countdown_s, exc=exc, argsrepr=retry_argsrepr(self)) from exc
        except (OperationalError, redis.RedisError) as exc:
            # The database or Redis is away: nothing was recorded as done, so try again later.
            log.warning("step %s/%s waits for storage: %s", run_id, step_id, exc)
            raise self.retry(
                countdown=STORAGE_RETRY_S, exc=exc, argsrepr=retry_argsrepr(self)
            ) from exc
        except SoftTimeLimitExceeded as exc:
            # Celery stopped the step: record it failed, with the limit, so that its run ends
            # instead of the step being delivered again until its delivery cap.
            limit_s = task_soft_time_limit_s(get_settings())
            message = f"stopped by the task time limit of {limit_s:g} s"
            fail_step(get_settings(), run_id, step_id, message)
            raise StepFailed(run_id, step_id, {"outcome": "failed", "message": message}) from exc
        return {"run_id": run_id, "step_id": step_id, "status": status}

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        run_id, step_id = args
        with logs.bound(run_id=run_id, step_id=step_id, action=self.action):
            if isinstance(exc, StepFailed):
                log.warning("%s", exc)
            else:
                log.error("task %s crashed: %r", task_id, exc)
                message = f"internal error: {type(exc).__name__}: {exc}"
                fail_step(get_settings(), run_id, step_id, message)
            count_run_if_ended(run_id)


def count_run_if_ended(run_id: str) -> None:
    """Count the run in the runs metric if it has ended: the step just recorded ended it."""
    try:
        with session_scope(get_settings().resolved_database_url) as session:
            run = session.get(FlowRun, run_id)
            if run is not None and run.status in FINAL_RUN_STATUSES:
                metrics.RUNS.labels(run.flow, run.status).inc()
    except OperationalError as exc:
        # The step is recorded: a lost count is better than running it again.
        log.warning("run %s not counted: %s", run_id, exc)


def _delivery_outcome(exc: BaseException) -> str:
    return next((name for kind, name in DELIVERY_OUTCOMES if isinstance(exc, kind)), CRASHED)


def _observe_delivery(action: str, status: str, started_s: float) -> None:
    metrics.STEP_DURATION.labels(action, status).observe(time.monotonic() - started_s)


def _step_task(action: str) -> Task:
    """Register the task of one action, named as the catalogue says."""

    def run(self: StepTask, run_id: str, step_id: str) -> dict[str, str]:
        with logs.bound(run_id=run_id, step_id=step_id, action=action):
            started_s = time.monotonic()
            try:
                result = self.run_step(run_id, step_id)
            except BaseException as exc:
                _observe_delivery(action, _delivery_outcome(exc), started_s)
                raise
            _observe_delivery(action, result["status"], started_s)
            count_run_if_ended(run_id)
            return result

    run.__name__ = action
    run.__doc__ = f"Execute a flow step whose action is {action}."
    return app.task(run, name=ACTIONS[action].task_name, base=StepTask, bind=True, action=action)


lookup_user = _step_task("lookup_user")
lookup_group = _step_task("lookup_group")
add_user_to_group = _step_task("add_user_to_group")
remove_member_from_group = _step_task("remove_member_from_group")


def retry_argsrepr(task: Task) -> str | None:
    """The readable arguments of the message being retried, for the new message Flower shows."""
    return getattr(task.request, "argsrepr", None)
