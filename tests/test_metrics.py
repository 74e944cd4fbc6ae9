"""Prometheus metrics: a real worker and scheduler serve `/metrics` and `/healthz` after a run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from entraflow import keys, logs, metrics
from entraflow.settings import DEFAULT_WRITES_PER_WINDOW, Settings
from harness.ports import free_port
from harness.stack import LocalStack
from harness.waiting import wait_until
from models.db import database_reachable, session_scope
from models.flows import Flow
from sandbox.directory import DEMO_GROUPS, DEMO_USERS
from scheduler.flows import FlowDefinition
from scheduler.producer import publish_event

HIRED = "hr.employee.hired"
FLOW_NAME = "add-sales-hire"
FLOW = {
    "name": FLOW_NAME,
    "trigger": {"type": HIRED},
    "steps": [
        {"id": "user", "action": "lookup_user", "with": {"upn": "{{ event.data.upn }}"}},
        {
            "id": "add",
            "action": "add_user_to_group",
            "with": {"user_id": "{{ steps.user.id }}", "group_id": "{{ event.data.group_id }}"},
        },
    ],
}
HTTP_TIMEOUT_S = 5.0
# Shorter than the worker waits in process: the throttled request is retried there and then.
THROTTLE_RETRY_AFTER = "1"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    answer = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=HTTP_TIMEOUT_S)
    answer.raise_for_status()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def store_flow(database_url: str) -> None:
    definition = FlowDefinition.model_validate(FLOW)
    with session_scope(database_url) as session:
        session.add(
            Flow(
                name=definition.name,
                trigger_type=definition.trigger.type,
                definition=definition.model_dump(by_alias=True),
            )
        )


@pytest.fixture
def metrics_stack(settings: Settings) -> Iterator[LocalStack]:
    """A worker and a scheduler, each serving its metrics on a port of its own."""
    local = LocalStack(
        home=settings.home,
        redis_url=settings.redis_url,
        database_url=settings.database_url,
        schedulers=1,
        worker_metrics_port=free_port(),
        scheduler_metrics_port=free_port(),
    )
    with local:
        yield local


@pytest.mark.integration
def test_worker_and_scheduler_metrics_count_a_run_triggered_by_an_event(
    metrics_stack: LocalStack, redis_client: redis.Redis
) -> None:
    stack = metrics_stack
    store_flow(stack.settings.resolved_database_url)
    stack.sandbox.app.add_fault(
        method="POST",
        path_regex=r"/members/\$ref$",
        status=429,
        retry_after=THROTTLE_RETRY_AFTER,
        count=1,
    )
    data = {"upn": DEMO_USERS["nestor"].upn, "group_id": DEMO_GROUPS["sales"].id}
    publish_event(redis_client, type=HIRED, source="hr", id="hire-1", data=data)

    def run_counted() -> bool:
        try:
            samples = scrape(stack.worker_metrics_port)
        except requests.ConnectionError:  # the worker is still starting
            return False
        return value(samples, "entraflow_runs_total", flow=FLOW_NAME, status="succeeded") == 1

    wait_until(run_counted, "the run to be counted by the worker")
    worker = scrape(stack.worker_metrics_port)
    for action in ("lookup_user", "add_user_to_group"):
        count = value(
            worker, "entraflow_step_duration_seconds_count", action=action, status="succeeded"
        )
        assert count == 1, action
    assert value(
        worker, "entraflow_graph_requests_total", action="lookup_user", method="GET", status="200"
    )
    throttled = value(
        worker,
        "entraflow_graph_requests_total",
        action="add_user_to_group",
        method="POST",
        status="429",
    )
    assert throttled == 1
    assert value(worker, "entraflow_graph_throttled_total", scope=metrics.UNKNOWN) == 1
    written = value(worker, "entraflow_graph_budget_used", budget="writes")
    assert written is not None and written >= 1
    limit = value(worker, "entraflow_graph_budget_limit", budget="writes")
    assert limit == DEFAULT_WRITES_PER_WINDOW
    assert value(worker, "entraflow_queue_depth", queue=keys.FLOWS_QUEUE) == 0
    assert value(worker, "entraflow_queue_depth", queue=keys.BULK_QUEUE) == 0

    scheduler = scrape(stack.scheduler_metrics_port)
    assert value(scheduler, "entraflow_events_total", outcome="accepted") == 1
    assert value(scheduler, "entraflow_events_total", outcome="dead") is None
    assert value(scheduler, "entraflow_events_pending", group=keys.SCHEDULERS_GROUP) == 0

    for port in (stack.worker_metrics_port, stack.scheduler_metrics_port):
        health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=HTTP_TIMEOUT_S)
        assert health.status_code == 200
        assert health.json() == {"redis": True, "database": True}


@pytest.mark.integration
def test_the_worker_metrics_directory_is_emptied_when_the_worker_starts(
    settings: Settings,
) -> None:
    port = free_port()
    directory = settings.home / "metrics" / f"worker-{port}"
    directory.mkdir(parents=True)
    stale = directory / "counter_1.db"
    stale.write_bytes(b"from a previous run")
    with LocalStack(
        home=settings.home,
        redis_url=settings.redis_url,
        database_url=settings.database_url,
        worker_metrics_port=port,
    ):
        wait_until(lambda: _answers(port), "the worker's metrics endpoint")
        assert not stale.exists()


def _answers(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=HTTP_TIMEOUT_S).ok
    except requests.ConnectionError:
        return False


def test_throttled_parts_of_a_batch_answer_are_counted_by_scope() -> None:
    scope = "Application/Write/app/tenant"
    before = REGISTRY.get_sample_value("entraflow_graph_throttled_total", {"scope": scope}) or 0
    response = requests.Response()
    response.status_code = 200
    response._content = json.dumps(
        {
            "responses": [
                {"id": "1", "status": 204},
                {"id": "2", "status": 429, "headers": {"x-ms-throttle-scope": scope}},
            ]
        }
    ).encode()

    with logs.bound(action="batch_chunk"):
        metrics.observe_graph_response(response)

    after = REGISTRY.get_sample_value("entraflow_graph_throttled_total", {"scope": scope})
    assert after == before + 1


def test_health_reports_an_unreachable_redis(tmp_path: Path) -> None:
    unreachable = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)

    database_url = f"sqlite:///{tmp_path / 'h.db'}"
    checks = metrics.health(unreachable, {"database": lambda: database_reachable(database_url)})

    assert checks == {"redis": False, "database": True}
