"""Two worker processes share one Graph budget: a 429 told to one makes the other wait too."""

from __future__ import annotations

import multiprocessing
import time
from multiprocessing.synchronize import Event

import pytest
import redis
import requests
from sandbox_fixtures import fetch_token

from sandbox.directory import DEMO_GROUPS, DEMO_USERS, SANDBOX_CLIENT_ID, SANDBOX_TENANT_ID
from sandbox.server import SandboxServer
from worker.budget import Budget, budget_hooks
from worker.errors import ThrottledError
from worker.graph import GraphClient
from worker.retry import RetryPolicy

pytestmark = pytest.mark.integration

RETRY_AFTER_S = 2
# Requests the waiting worker sends once the other one has been throttled.
WAITING_REQUESTS = 3
# Longest a worker process may take, start-up included.
PROCESS_TIMEOUT_S = 60.0
THROTTLED_PATH = f"/groups/{DEMO_GROUPS['falcon'].id}"


class _SandboxTokens:
    def __init__(self, url: str) -> None:
        self._token = fetch_token(requests.Session(), url)

    def token(self, rejected: str | None = None) -> str:
        return self._token


def _worker(
    sandbox_url: str,
    redis_url: str,
    throttled: Event,
    told: bool,
    sent_at: multiprocessing.Queue[list[float]],
) -> None:
    """One worker process: a Graph client paying from the shared budget; reports send times."""
    budget = Budget(redis.Redis.from_url(redis_url), SANDBOX_CLIENT_ID, SANDBOX_TENANT_ID)
    pay, report = budget_hooks(budget)
    times: list[float] = []

    def before_request(method: str, target: str) -> None:
        pay(method, target)
        times.append(time.time())

    client = GraphClient(
        sandbox_url + "/v1.0",
        _SandboxTokens(sandbox_url),
        retry_policy=RetryPolicy(max_attempts=1),
        before_request=before_request,
        after_response=report,
    )
    if told:
        try:
            client.request("GET", THROTTLED_PATH, params={"$select": "id"})
        except ThrottledError:
            throttled.set()
        client.request("GET", THROTTLED_PATH, params={"$select": "id"})
    else:
        throttled.wait(PROCESS_TIMEOUT_S)
        for _ in range(WAITING_REQUESTS):
            client.request("GET", f"/users/{DEMO_USERS['adele'].id}", params={"$select": "id"})
    sent_at.put(times)


def test_a_429_told_to_one_worker_process_pauses_the_other(
    sandbox_server: SandboxServer, redis_url: str, redis_client: redis.Redis
) -> None:
    sandbox_server.app.add_fault(
        f"{THROTTLED_PATH}$", method="GET", status=429, retry_after=str(RETRY_AFTER_S), count=1
    )
    context = multiprocessing.get_context("spawn")
    throttled = context.Event()
    told_times: multiprocessing.Queue[list[float]] = context.Queue()
    waiting_times: multiprocessing.Queue[list[float]] = context.Queue()
    processes = [
        context.Process(
            target=_worker, args=(sandbox_server.url, redis_url, throttled, told, queue)
        )
        for told, queue in ((True, told_times), (False, waiting_times))
    ]
    for process in processes:
        process.start()

    told_sent = told_times.get(timeout=PROCESS_TIMEOUT_S)
    waiting_sent = waiting_times.get(timeout=PROCESS_TIMEOUT_S)
    for process in processes:
        process.join(PROCESS_TIMEOUT_S)

    assert [process.exitcode for process in processes] == [0, 0]
    stats = sandbox_server.app.stats()
    assert stats["requests"]["GET"] == {"group": 2, "user": WAITING_REQUESTS}
    assert stats["responses"]["429"] == 1
    assert stats["early_retries"] == 0
    throttled_at = told_sent[0]
    assert len(waiting_sent) == WAITING_REQUESTS
    # Neither worker sent anything until Retry-After had passed since the 429.
    assert min(waiting_sent) - throttled_at >= RETRY_AFTER_S
    assert told_sent[1] - throttled_at >= RETRY_AFTER_S
