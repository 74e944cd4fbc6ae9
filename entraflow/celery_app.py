"""The one Celery app of entraflow; its configuration is derived from the settings, lazily.

The scheduler and the CLI import this module to send tasks by name; only a worker imports the
task code (`include`), so the two deploy and scale apart.
"""

from __future__ import annotations

import ssl
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from kombu.utils.url import parse_url

from entraflow import keys
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


class EntraflowTask(Task):
    """The base of every entraflow task: a retry the broker refuses puts the message back."""

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().retry(*args, **kwargs)
        except Reject as exc:
            if exc.requeue:
                raise
            # Celery rejects the message for good when its retry cannot be sent, and a run or a
            # batch then waits forever. Put back instead: redelivered as soon as the broker is
            # there, or, while it is not, left unacknowledged for the visibility timeout.
            raise Reject(exc.reason, requeue=True) from exc


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
        "task_routes": {"entraflow.batch_*": {"queue": keys.BULK_QUEUE}},
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
