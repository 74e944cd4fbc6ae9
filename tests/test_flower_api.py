"""Flower's API over a real worker: entraflow's task names, ids as arguments, never a secret."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from flower_process import CREDENTIALS, running_flower

from harness.stack import LocalStack
from harness.waiting import wait_until
from models.batch_reports import batch_view
from models.batches import ItemAction, NewItem
from models.history import wait_for_run
from sandbox.directory import DEMO_GROUPS, DEMO_USERS, SANDBOX_CLIENT_SECRET
from scheduler.batches import submit_batch
from scheduler.runs import start_run

pytestmark = pytest.mark.integration

WAIT_S = 60.0
FLOW_STEPS: list[dict[str, Any]] = [
    {"id": "user", "action": "lookup_user", "with": {"upn": "{{ event.data.upn }}"}},
    {
        "id": "add",
        "action": "add_user_to_group",
        "with": {"user_id": "{{ steps.user.id }}", "group_id": "{{ event.data.group_id }}"},
    },
]
FLOW_TASKS = {"user": "entra.lookup_user", "add": "entra.add_user_to_group"}
BATCH_USERS = ("adele", "nestor", "megan")
BATCH_GROUP = DEMO_GROUPS["falcon"].id  # no members to start with
# A chunk reports its progress as a custom state before it succeeds.
CHUNK_STATES = {"SUCCESS", "PROGRESS"}


@pytest.fixture
def flower_url(stack: LocalStack) -> Iterator[str]:
    assert stack.redis_url
    with running_flower(stack.redis_url) as url:
        # Flower answers HTTP before its event thread has subscribed, and events sent before that
        # are gone (Redis fanout): wait until it has heard a worker's heartbeat.
        wait_until(
            lambda: any(api(url, "workers?status=1").values()),
            "Flower to hear a worker's events",
            timeout_s=WAIT_S,
        )
        yield url


def api(flower_url: str, path: str) -> Any:
    answer = requests.get(f"{flower_url}/api/{path}", auth=CREDENTIALS, timeout=10)
    answer.raise_for_status()
    return answer.json()


def issued_access_tokens(stack: LocalStack) -> list[str]:
    sandbox = stack.sandbox.app
    with sandbox._lock:  # the sandbox keeps them private; a leak check has to know them
        return list(sandbox._tokens._tokens)


def run_flow_and_batch(stack: LocalStack) -> tuple[str, str]:
    database_url = stack.settings.resolved_database_url
    event = {
        "specversion": "1.0",
        "id": "evt-flower",
        "source": "tests",
        "type": "t",
        "data": {"upn": DEMO_USERS["nestor"].upn, "group_id": DEMO_GROUPS["sales"].id},
    }
    run_id = start_run(stack.settings, "flower-flow", FLOW_STEPS, event)
    assert wait_for_run(database_url, run_id, timeout_s=WAIT_S)["status"] == "succeeded"
    items = [
        NewItem(line, ItemAction.ADD, DEMO_USERS[name].id, BATCH_GROUP)
        for line, name in enumerate(BATCH_USERS, start=2)
    ]
    batch_id = submit_batch(stack.settings, "flower-test.csv", items)
    wait_until(
        lambda: (batch_view(database_url, batch_id) or {}).get("status") == "succeeded",
        "the batch to succeed",
        timeout_s=WAIT_S,
    )
    return run_id, batch_id


def test_flower_shows_entraflow_tasks_with_ids_as_arguments_and_no_secret(
    stack: LocalStack, flower_url: str
) -> None:
    run_id, batch_id = run_flow_and_batch(stack)

    def finished(tasks: dict[str, Any]) -> bool:
        states = {(t["name"], t["state"]) for t in tasks.values()}
        return {(name, "SUCCESS") for name in FLOW_TASKS.values()} <= states and any(
            name == "entra.batch.chunk" and state in CHUNK_STATES for name, state in states
        )

    def finished_tasks() -> dict[str, Any] | None:
        tasks = api(flower_url, "tasks")
        return tasks if finished(tasks) else None

    tasks = wait_until(finished_tasks, "Flower to show the finished tasks", timeout_s=WAIT_S)

    by_name: dict[str, list[dict[str, Any]]] = {}
    for task in tasks.values():
        assert task["name"].startswith(("entra.", "entraflow.")), task["name"]
        by_name.setdefault(task["name"], []).append(task)
    for step_id, name in FLOW_TASKS.items():
        (task,) = by_name[name]
        assert task["state"] == "SUCCESS"
        assert task["args"] == f"run_id={run_id!r}, step_id={step_id!r}"
        assert task["kwargs"] == "{}"
    (start,) = by_name["entra.batch.start"]
    assert start["state"] == "SUCCESS"
    assert start["args"] == f"batch_id={batch_id!r}"
    for chunk in by_name["entra.batch.chunk"]:
        assert chunk["state"] in CHUNK_STATES
        assert chunk["args"].startswith(f"batch_id={batch_id!r}, chunk=")

    # Flower asks the workers (a broadcast) only when told to refresh, and keeps only the answers
    # that arrive within its inspect timeout (1 s): ask again until every worker's list came back.
    def workers_with_tasks() -> dict[str, Any] | None:
        workers = api(flower_url, "workers?refresh=1")
        return workers if workers and all("registered" in w for w in workers.values()) else None

    workers = wait_until(workers_with_tasks, "Flower to list the workers' tasks", timeout_s=WAIT_S)
    for worker in workers.values():
        registered = [n for n in worker.get("registered", []) if not n.startswith("celery.")]
        assert registered and all(n.startswith(("entra.", "entraflow.")) for n in registered)

    details = [api(flower_url, f"task/info/{task_id}") for task_id in tasks]
    seen = json.dumps([tasks, workers, details])
    secrets = [SANDBOX_CLIENT_SECRET, *issued_access_tokens(stack)]
    assert len(secrets) >= 2, "the worker never fetched a token"
    for secret in secrets:
        assert secret not in seen
    assert "Bearer" not in seen
