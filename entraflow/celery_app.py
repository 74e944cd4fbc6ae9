"""The one Celery app of entraflow: its configuration, derived lazily from the settings, and
the base class of its tasks.

The scheduler and the CLI import this module to send tasks by name; only a worker imports the
task code (`include`), so the two deploy and scale apart.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded
from kombu.utils.url import parse_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from entraflow import keys, kombu_redis, logs
from entraflow.catalogue import TASK_QUEUES
from entraflow.redis_server import redis_url
from entraflow.settings import Settings, get_settings

# A countdown waits on the broker unacknowledged, so it must end well within the visibility
# timeout or Redis delivers the message a second time: this share of it at most.
COUNTDOWN_SHARE_OF_VISIBILITY = 0.75
# How often a worker looks for messages whose worker died (older than the visibility timeout).
UNACKED_RESTORE_INTERVAL_S = 10
# A task message sent while the broker is away (a Redis restart) is tried again for about this
# long before its sender gives up: a step's retry, a chain's next step, a batch's chunks, the
# scheduler's runs. Celery's default, about a second, drops them for any restart.
PUBLISH_PATIENCE_S = 30.0
# kombu waits this much longer after each refused publish, up to the maximum.
PUBLISH_RETRY_STEP_S = 0.2
PUBLISH_RETRY_MAX_INTERVAL_S = 1.0
# A task still running at this share of the visibility timeout is stopped: Celery raises
# SoftTimeLimitExceeded in it, and a step records it as failed. Redis would hand its message to
# another worker at the visibility timeout anyway.
SOFT_TIME_LIMIT_SHARE_OF_VISIBILITY = 0.8
# ...but never before the longest legitimate delivery (a step spending its whole Graph retry
# time in process, the last request and wait included) has had this much more: a short
# visibility timeout (tests, the chaos stack: 5 s, 60 s) must not fail work that is only slow.
TIME_LIMIT_MARGIN_S = 30.0
# A task that does not stop at the soft limit (stuck in C code) is killed this much later: its
# message is put back (task_reject_on_worker_lost).
HARD_AFTER_SOFT_TIME_LIMIT_S = 30.0
# How long a delivery waits before trying again when the database or Redis does not answer.
STORAGE_RETRY_S = 5.0
# The database or Redis failing: nothing was recorded as done, so the delivery may try again;
# `EntraflowTask.waits_on` tells a failure that passes (storage away) from a refusal.
STORAGE_ERRORS: tuple[type[Exception], ...] = (SQLAlchemyError, redis.RedisError)
# The waits logged as warnings: storage away, a body stopped by the task time limit.
NOTABLE_WAITS = (*STORAGE_ERRORS, SoftTimeLimitExceeded)
# What a delivery that did not return is counted as; a task may name more (a step's failure).
DELIVERY_OUTCOMES: tuple[tuple[type[BaseException], str], ...] = (
    (Retry, "retrying"),
    (Ignore, "duplicate"),
)
# A delivery that returned, without a status of its own; one that raised anything else.
SUCCEEDED = "succeeded"
CRASHED = "crashed"

log = logging.getLogger(__name__)


class EntraflowTask(Task):
    """The base of every entraflow task: what a delivery does around the task's body.

    The body is a thin adapter; this class tags the delivery's log lines with the ids it
    carries, sends it back to the queue when the body raises one of `waits_for` (storage away,
    Graph asking for a wait), caps every countdown within the visibility timeout, puts the
    message back when the broker refuses a retry, and tells `observe` how each delivery ended.
    """

    # The names of the task's leading arguments: ids that tag every line a delivery logs.
    id_args: tuple[str, ...] = ()
    # The action a delivery's log lines, and so its Graph requests, are labelled with.
    action: str | None = None
    # Errors after which the body runs again, `countdown_s(exc)` later, instead of failing.
    waits_for: tuple[type[Exception], ...] = STORAGE_ERRORS
    # How a delivery that raised ended, by the first class its exception is an instance of.
    delivery_outcomes: tuple[tuple[type[BaseException], str], ...] = DELIVERY_OUTCOMES

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.log_context(args):
            started_s = time.monotonic()
            try:
                result = self._run_or_wait(*args, **kwargs)
            except BaseException as exc:
                self.observe(self._outcome(exc), time.monotonic() - started_s)
                raise
            # A step's result names the status the delivery left it in.
            self.observe(result.get("status", SUCCEEDED), time.monotonic() - started_s)
            return result

    def _run_or_wait(self, *args: Any, **kwargs: Any) -> Any:
        # Celery's tracer has pushed this delivery's request: run the body under it
        # (Task.__call__ would push a second, empty one, and a retry would lose the delivery).
        try:
            return self.run(*args, **kwargs)
        except self.waits_for as exc:
            if not self.waits_on(exc):
                raise
            countdown_s = self.countdown_s(exc)
            # Storage away and a body stopped by the time limit are worth a look; a wait that
            # Graph asked for is routine.
            level = logging.WARNING if isinstance(exc, NOTABLE_WAITS) else logging.INFO
            delivery = f"{self.name}({', '.join(map(str, args))})"
            log.log(level, "%s retries in %.1f s: %s", delivery, countdown_s, str(exc) or repr(exc))
            raise self.retry(countdown=countdown_s, exc=exc) from exc

    def log_context(self, args: Sequence[Any]) -> AbstractContextManager[None]:
        """Tag the lines logged inside the block with the ids of a delivery of `args`."""
        return logs.bound(**dict(zip(self.id_args, args, strict=False)), action=self.action)

    def waits_on(self, exc: Exception) -> bool:
        """Whether `exc`, one of `waits_for`, passes with time; a database error only if it is
        an OperationalError (a task that knows the database judges more closely)."""
        return not isinstance(exc, SQLAlchemyError) or isinstance(exc, OperationalError)

    def countdown_s(self, exc: Exception) -> float:
        """How long to wait before the next delivery after `exc`, one of `waits_for`."""
        return STORAGE_RETRY_S

    def observe(self, outcome: str, duration_s: float) -> None:
        """Record how one delivery ended and how long it took; a task that is measured says how."""

    def _outcome(self, exc: BaseException) -> str:
        return next(
            (name for kind, name in self.delivery_outcomes if isinstance(exc, kind)), CRASHED
        )

    def retry(self, *args: Any, countdown: float | None = None, **options: Any) -> Any:
        """Send the delivery back to the queue, at most `max_retry_countdown_s` from now."""
        if countdown is not None:
            countdown = min(countdown, max_retry_countdown_s(get_settings()))
        # The new message shows Flower the same readable arguments as this one.
        options.setdefault("argsrepr", getattr(self.request, "argsrepr", None))
        try:
            return super().retry(*args, countdown=countdown, **options)
        except Reject as exc:
            if exc.requeue:
                raise
            # Celery rejects the message for good when its retry cannot be sent, and a run or a
            # batch then waits forever. Put back instead: redelivered as soon as the broker is
            # there, or, while it is not, left unacknowledged for the visibility timeout.
            raise Reject(exc.reason, requeue=True) from exc


kombu_redis.apply()
app = Celery("entraflow", include=["worker.tasks", "worker.batch_tasks"], task_cls=EntraflowTask)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery's settings for this deployment."""
    broker = redis_url(settings)
    return {
        "broker_url": broker,
        "broker_use_ssl": broker_ssl_options(broker),
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            # Look for a dead worker's messages every interval, not every tenth one.
            "unacked_restore_interval": UNACKED_RESTORE_INTERVAL_S,
            "unacked_restore_throttle": 1,
        },
        "broker_connection_retry_on_startup": True,
        "task_publish_retry_policy": {
            "max_retries": round(PUBLISH_PATIENCE_S / PUBLISH_RETRY_MAX_INTERVAL_S),
            "interval_start": 0,
            "interval_step": PUBLISH_RETRY_STEP_S,
            "interval_max": PUBLISH_RETRY_MAX_INTERVAL_S,
        },
        # Run history lives in SQL; task results would only duplicate it.
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": keys.FLOWS_QUEUE,
        "task_routes": {name: {"queue": queue} for name, queue in TASK_QUEUES.items()},
        # A message is acknowledged only after its step is recorded, so a crash redelivers it.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": task_soft_time_limit_s(settings),
        "task_time_limit": task_soft_time_limit_s(settings) + HARD_AFTER_SOFT_TIME_LIMIT_S,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "enable_utc": True,
    }


def task_soft_time_limit_s(settings: Settings) -> float:
    """How long a task may run before Celery stops it with SoftTimeLimitExceeded."""
    longest_delivery_s = (
        settings.max_graph_retry_time_s + settings.http_timeout_s + settings.max_inprocess_wait_s
    )
    return max(
        settings.visibility_timeout_s * SOFT_TIME_LIMIT_SHARE_OF_VISIBILITY,
        longest_delivery_s + TIME_LIMIT_MARGIN_S,
    )


def broker_ssl_options(url: str) -> dict[str, Any] | None:
    """TLS options of a `rediss://` broker: the URL's `ssl_*` parameters, verifying by default."""
    if not url.startswith("rediss:"):
        return None
    # kombu turns certificate checks off for a rediss:// URL without ssl_* parameters, and
    # Flower reads TLS options from this setting only, never from the URL.
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED, **(parse_url(url).get("ssl") or {})}


def max_retry_countdown_s(settings: Settings) -> float:
    """The longest countdown a step may go back to the queue with; longer waits take two hops."""
    return settings.visibility_timeout_s * COUNTDOWN_SHARE_OF_VISIBILITY


class _LazyConfig:
    """Celery's configuration source: derived from the settings when Celery first reads it.

    Reading it late keeps imports cheap (`entraflow --help` starts no Redis) and lets a test or
    the demo set the environment first.
    """

    def __init__(self) -> None:
        self._values: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._values is None:
            self._values = celery_config(get_settings())
        return self._values

    def __getattr__(self, name: str) -> Any:
        try:
            return self._load()[name]
        except KeyError:
            raise AttributeError(name) from None

    def __dir__(self) -> list[str]:
        return list(self._load())


app.config_from_object(_LazyConfig())
