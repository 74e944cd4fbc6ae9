"""Every Prometheus metric of entraflow, and the small HTTP server of `/metrics` and `/healthz`.

Counters and histograms are incremented where the work happens (task bodies, the Graph client's
hooks, the scheduler); queue depths and the Graph budget are read from Redis when scraped.

A worker is several processes (Celery's prefork pool). Its metrics use prometheus_client's
multiprocess mode: each child writes its samples to memory-mapped files in a directory under
`ENTRAFLOW_HOME`, and the parent's server sums them at scrape time. That is chosen over children
reporting through the parent because it needs no channel of our own, survives a child killed
mid-task (its last increments are already in the file), and counters stay monotonic when Celery
replaces a child. Every metric here has labels, so its values are created after
`enable_multiprocess` switches the value class, in the children.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis
import requests
from kombu.transport.redis import PRIORITY_STEPS, Channel
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from entraflow import keys
from entraflow.home import private_folder
from entraflow.logs import current

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_PATH = "/metrics"
HEALTH_PATH = "/healthz"
# Step deliveries take milliseconds in process and up to minutes waiting on Graph in process.
STEP_DURATION_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 180)
THROTTLE_SCOPE_HEADER = "x-ms-throttle-scope"
TOO_MANY_REQUESTS = 429
UNKNOWN = "unknown"
# The action label of Graph requests sent outside a step or a chunk (the CLI, a connection).
NO_ACTION = "none"
QUEUES = (keys.FLOWS_QUEUE, keys.BULK_QUEUE)
# Why a Graph budget cannot be read: no app or tenant configured, Redis or the database away.
BUDGET_READ_ERRORS = (ValueError, redis.RedisError, SQLAlchemyError)

RUNS = Counter(
    "entraflow_runs", "Flow runs that ended, by flow and final status.", ["flow", "status"]
)
STEP_DURATION = Histogram(
    "entraflow_step_duration_seconds",
    "Time one delivery of a flow step took, by action and the status it left the step in.",
    ["action", "status"],
    buckets=STEP_DURATION_BUCKETS_S,
)
GRAPH_REQUESTS = Counter(
    "entraflow_graph_requests",
    "HTTP answers from Graph, by the action sending, method and status code.",
    ["action", "method", "status"],
)
GRAPH_THROTTLES = Counter(
    "entraflow_graph_throttled",
    "429 answers from Graph (whole requests or $batch parts), by x-ms-throttle-scope.",
    ["scope"],
)
EVENTS = Counter(
    "entraflow_events", "Event stream entries handled by the scheduler, by outcome.", ["outcome"]
)
BATCH_ROWS = Counter(
    "entraflow_batch_rows", "Rows of bulk batches applied, by outcome.", ["outcome"]
)
ALL_METRICS = (RUNS, STEP_DURATION, GRAPH_REQUESTS, GRAPH_THROTTLES, EVENTS, BATCH_ROWS)

# What a scrape reads about the Graph budget: {budget: (used now, limit)}.
BudgetReader = Callable[[], Mapping[str, tuple[int, int]]]
# Whether this process reaches one service, for `/healthz`: passed in by the process serving, so
# that this ground module knows no service but Redis (the database's is `database_reachable`).
HealthProbe = Callable[[], bool]


def enable_multiprocess(directory: Path) -> None:
    """Switch this process, and the children it forks, to multiprocess metrics in `directory`.

    The directory is emptied first: files of a previous run's processes would be summed in.
    """
    shutil.rmtree(directory, ignore_errors=True)
    private_folder(directory)
    os.environ[MULTIPROC_ENV] = str(directory)
    # prometheus_client picks its value class at import, which the CLI's imports came before.
    values.ValueClass = values.get_value_class()


def process_exited(pid: int) -> None:
    """Drop a worker child's live samples as it exits; its counters stay in the sums."""
    multiprocess.mark_process_dead(pid)


def action_label() -> str:
    """The Entra action (or bulk task) the current Graph request is sent for."""
    return current().get("action", NO_ACTION)


def observe_graph_response(response: requests.Response) -> None:
    """Count one Graph answer and its throttles."""
    method = response.request.method if response.request is not None else None
    GRAPH_REQUESTS.labels(action_label(), method or UNKNOWN, str(response.status_code)).inc()
    for headers in _throttled_parts(response):
        scope = {k.lower(): v for k, v in headers.items()}.get(THROTTLE_SCOPE_HEADER)
        GRAPH_THROTTLES.labels(scope or UNKNOWN).inc()


def counting_responses(
    after_response: Callable[[requests.Response], None] | None,
) -> Callable[[requests.Response], None]:
    """A Graph client's `after_response` hook that counts every answer, then calls the given one."""

    def after(response: requests.Response) -> None:
        observe_graph_response(response)
        if after_response is not None:
            after_response(response)

    return after


def _throttled_parts(response: requests.Response) -> Iterator[Mapping[str, str]]:
    if response.status_code == TOO_MANY_REQUESTS:
        yield response.headers
        return
    try:
        answer = response.json() if response.content else None
    except ValueError:
        return
    parts = answer.get("responses") if isinstance(answer, dict) else None
    for part in parts if isinstance(parts, list) else []:
        if isinstance(part, dict) and part.get("status") == TOO_MANY_REQUESTS:
            yield part.get("headers") or {}


class StateCollector(Collector):
    """Gauges read from Redis at scrape time: queue depths, pending events, the Graph budget."""

    def __init__(self, redis_client: redis.Redis, budget: BudgetReader | None = None) -> None:
        self._redis = redis_client
        self._budget = budget

    def collect(self) -> Iterable[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "entraflow_queue_depth", "Celery messages waiting on a queue.", labels=["queue"]
        )
        pending = GaugeMetricFamily(
            "entraflow_events_pending",
            "Events read by a scheduler and not yet acknowledged.",
            labels=["group"],
        )
        try:
            for queue, length in self._queue_depths():
                depth.add_metric([queue], length)
            pending.add_metric([keys.SCHEDULERS_GROUP], self._events_pending())
        except redis.RedisError as exc:
            # A scrape must answer; the missing series and /healthz tell the rest.
            log.warning("queue depths unavailable: %s", exc)
            return
        yield depth
        yield pending
        if self._budget is not None:
            yield from self._budget_gauges()

    def _queue_depths(self) -> list[tuple[str, int]]:
        pipe = self._redis.pipeline(transaction=False)
        for queue in QUEUES:
            # Kombu keeps each priority level of a queue in a list of its own.
            for priority in PRIORITY_STEPS:
                pipe.llen(f"{queue}{Channel.sep}{priority}" if priority else queue)
        lengths = pipe.execute()
        per_queue = len(PRIORITY_STEPS)
        return [
            (queue, sum(lengths[i * per_queue : (i + 1) * per_queue]))
            for i, queue in enumerate(QUEUES)
        ]

    def _events_pending(self) -> int:
        try:
            summary: Any = self._redis.xpending(keys.EVENTS_STREAM, keys.SCHEDULERS_GROUP)
        except redis.ResponseError:  # no stream or group yet: nothing is pending
            return 0
        return int(summary["pending"])

    def _budget_gauges(self) -> Iterator[GaugeMetricFamily]:
        assert self._budget is not None
        used = GaugeMetricFamily(
            "entraflow_graph_budget_used",
            "Units of the shared Graph budget spent in its current rolling window.",
            labels=["budget"],
        )
        limit = GaugeMetricFamily(
            "entraflow_graph_budget_limit",
            "Units the shared Graph budget allows per rolling window.",
            labels=["budget"],
        )
        try:
            readings = self._budget()
        except BUDGET_READ_ERRORS as exc:
            # A broken reading must not fail the scrape.
            log.warning("Graph budget unavailable: %s", type(exc).__name__)
            return
        for name, (spent, allowed) in readings.items():
            used.add_metric([name], spent)
            limit.add_metric([name], allowed)
        yield used
        yield limit


def registry_for(state: StateCollector) -> CollectorRegistry:
    """This process's samples (or its worker's processes' in multiprocess mode) and `state`."""
    registry = CollectorRegistry()
    if MULTIPROC_ENV in os.environ:
        multiprocess.MultiProcessCollector(registry)
    else:
        for metric in ALL_METRICS:
            registry.register(metric)
    registry.register(state)
    return registry


def health(redis_client: redis.Redis, probes: Mapping[str, HealthProbe]) -> dict[str, bool]:
    """Whether this process reaches Redis and each service of `probes`, by name."""
    checks = {"redis": False}
    try:
        checks["redis"] = bool(redis_client.ping())
    except redis.RedisError as exc:
        log.warning("health: Redis unreachable: %s", exc)
    for name, probe in probes.items():
        checks[name] = probe()
    return checks


class MetricsServer:
    """`/metrics` and `/healthz` over HTTP on a thread of its own."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        check_health: Callable[[], dict[str, bool]],
    ) -> None:
        handler = _handler(registry, check_health)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics on port %d", self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(
    registry: CollectorRegistry, check_health: Callable[[], dict[str, bool]]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.partition("?")[0]
            if path == METRICS_PATH:
                self._answer(HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path == HEALTH_PATH:
                checks = check_health()
                status = HTTPStatus.OK if all(checks.values()) else HTTPStatus.SERVICE_UNAVAILABLE
                self._answer(status, "application/json", json.dumps(checks).encode())
            else:
                self._answer(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")

        def _answer(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # Prometheus scrapes every few seconds: an access log line each time is noise.
            pass

    return Handler


def serve(
    host: str,
    port: int,
    redis_client: redis.Redis,
    probes: Mapping[str, HealthProbe],
    budget: BudgetReader | None = None,
) -> MetricsServer:
    """Start serving this process's `/metrics` and `/healthz` on `host:port`."""
    registry = registry_for(StateCollector(redis_client, budget))
    return MetricsServer(host, port, registry, lambda: health(redis_client, probes)).start()
