"""The shared Graph budget on fakeredis: accounting, corrections, pauses, slowdown, priority.

fakeredis runs the budget's Lua scripts in-process (lupa); the budget across real worker
processes on a real server is `test_budget_processes.py`.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis
from fake_transport import FakeTokens, FakeTransport, Reply, graph_error
from sandbox_fixtures import FakeClock

from entraflow import keys
from entraflow.settings import PatchWriteCost, Settings
from worker.budget import (
    WINDOW_MARGIN_S,
    Budget,
    BudgetExhaustedError,
    Cost,
    Priority,
    budget_hooks,
    estimate_cost,
)
from worker.errors import ThrottledError
from worker.graph import GraphClient
from worker.retry import RetryPolicy

GRAPH_URL = "https://graph.microsoft.com/v1.0"
APP_ID = "0b9e2d4c-6a1f-4e3b-8d5c-2f7a9e1b3c58"
TENANT_ID = "7f6c1a52-3d4e-4b8a-9c1f-5e2d8a0b4c61"
OTHER_TENANT_ID = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
GID = "0b5e3f43-7c2f-4f4a-9d6e-2a1b3c4d5e6f"
UID = "6f5e4d3c-2b1a-4e9d-a4f7-2c7f3e5b0b11"
WRITE_SCOPE = f"Tenant_Application/Write/{APP_ID}/{TENANT_ID}"
READ = Cost(1)
WRITE = Cost(1, 1)


# Retry waits are recorded instead of slept (the conftest fixture).
pytestmark = pytest.mark.usefixtures("no_sleeping")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def new_budget(
    fake_redis: redis.Redis, clock: FakeClock, tenant_id: str = TENANT_ID, **limits: Any
) -> Budget:
    """A budget on the test's Redis whose waits move the fake clock instead of sleeping."""
    return Budget(fake_redis, APP_ID, tenant_id, clock=clock, sleep=clock.sleep, **limits)


def new_client(
    budget: Budget, transport: FakeTransport, priority: Priority = Priority.NORMAL
) -> GraphClient:
    """A Graph client paying from `budget`, with no retries of its own."""
    before, after = budget_hooks(budget, priority)
    return GraphClient(
        GRAPH_URL,
        FakeTokens(),
        session=transport.session(),
        retry_policy=RetryPolicy(max_attempts=1),
        before_request=before,
        after_response=after,
    )


@pytest.mark.parametrize(
    ("method", "target", "cost"),
    [
        ("GET", f"/users/{UID}?$select=id,displayName", Cost(1)),
        ("GET", "/users?$filter=mail%20eq%20'a%40b.c'&$select=id", Cost(1)),
        ("GET", "/users", Cost(2)),
        ("GET", f"/groups/{GID}/members", Cost(3)),
        ("GET", f"/groups/{GID}/members?$select=id&$top=999", Cost(2)),
        ("GET", f"{GRAPH_URL}/groups/{GID}/members?$select=id&$top=999&$skiptoken=x", Cost(2)),
        ("GET", f"/groups/{GID}?$select=id", Cost(1)),
        ("GET", f"/groups/{GID}/members?$top=5", Cost(2)),
        ("POST", f"/groups/{GID}/members/$ref", Cost(1, 1)),
        ("DELETE", f"/groups/{GID}/members/{UID}/$ref", Cost(1, 1)),
        ("PATCH", f"/groups/{GID}", Cost(1, 1)),
        ("POST", "/$batch", Cost(20, 20)),
    ],
)
def test_costs_are_estimated_by_graphs_rules_before_sending(
    method: str, target: str, cost: Cost
) -> None:
    assert estimate_cost(method, target) == cost


def test_a_members_patch_is_estimated_at_twenty_writes_when_graph_charges_per_member() -> None:
    assert estimate_cost("PATCH", f"/groups/{GID}", PatchWriteCost.MEMBER) == Cost(1, 20)


def test_every_request_takes_its_cost_from_the_budget(
    fake_redis: redis.Redis, clock: FakeClock
) -> None:
    budget = new_budget(fake_redis, clock)
    transport = FakeTransport([Reply(200, {"value": []}), Reply(204)])
    client = new_client(budget, transport)

    client.request("GET", f"/groups/{GID}/members", params={"$select": "id", "$top": "999"})
    client.request("DELETE", f"/groups/{GID}/members/{UID}/$ref")

    assert budget.usage() == Cost(ru=3, writes=1)


def test_graphs_resource_unit_header_corrects_the_estimate(
    fake_redis: redis.Redis, clock: FakeClock
) -> None:
    budget = new_budget(fake_redis, clock)
    transport = FakeTransport([Reply(200, {"id": UID}, {"x-ms-resource-unit": "5"})])

    new_client(budget, transport).request("GET", f"/users/{UID}", params={"$select": "id"})

    assert budget.usage() == Cost(ru=5)


def test_a_request_graph_refused_without_charging_is_refunded(
    fake_redis: redis.Redis, clock: FakeClock
) -> None:
    budget = new_budget(fake_redis, clock)
    refused = graph_error(
        429, "TooManyRequests", headers={"Retry-After": "1", "x-ms-resource-unit": "0"}
    )
    client = new_client(budget, FakeTransport([refused]))

    with pytest.raises(ThrottledError):
        client.request("DELETE", f"/groups/{GID}/members/{UID}/$ref")

    assert budget.usage() == Cost(0, 0)


def test_a_members_patch_counts_the_members_it_bound_when_graph_charges_per_member(
    fake_redis: redis.Redis, clock: FakeClock
) -> None:
    budget = new_budget(fake_redis, clock, patch_write_cost=PatchWriteCost.MEMBER)
    binds = [f"{GRAPH_URL}/directoryObjects/{UID}"] * 3
    client = new_client(budget, FakeTransport([Reply(204, headers={"x-ms-resource-unit": "1"})]))

    client.request("PATCH", f"/groups/{GID}", json={"members@odata.bind": binds})

    assert budget.usage() == Cost(ru=1, writes=3)


def test_a_batch_is_charged_for_its_parts_and_a_throttled_part_pauses_every_worker(
    fake_redis: redis.Redis, clock: FakeClock
) -> None:
    budget = new_budget(fake_redis, clock)
    parts = [
        {"id": str(n), "method": "DELETE", "url": f"/groups/{GID}/members/{UID}/$ref"}
        for n in range(3)
    ]
    throttled = {"Retry-After": "2", "x-ms-resource-unit": "0", "x-ms-throttle-scope": WRITE_SCOPE}
    answer = {
        "responses": [
            {"id": "0", "status": 204, "headers": {"x-ms-resource-unit": "1"}},
            {"id": "1", "status": 404, "headers": {"x-ms-resource-unit": "1"}},
            {"id": "2", "status": 429, "headers": throttled},
        ]
    }
    transport = FakeTransport([Reply(200, answer, {"x-ms-resource-unit": "2"})])

    new_client(budget, transport).request("POST", "/$batch", json={"requests": parts})

    assert budget.usage() == Cost(ru=2, writes=2)
    other_worker = new_budget(fake_redis, clock)
    other_worker.acquire(WRITE)
    assert sum(clock.slept) == pytest.approx(2.0)


def test_a_429_pauses_every_worker_for_its_retry_after(
    fake_redis: redis.Redis, clock: FakeClock
) -> None:
    throttled = graph_error(
        429, "TooManyRequests", headers={"Retry-After": "2", "x-ms-throttle-scope": WRITE_SCOPE}
    )
    told = new_client(new_budget(fake_redis, clock), FakeTransport([throttled]))
    other_worker = new_budget(fake_redis, clock)

    with pytest.raises(ThrottledError):
        told.request("POST", f"/groups/{GID}/members/$ref", json={})
    other_worker.acquire(READ)
    slept_for_read = sum(clock.slept)
    other_worker.acquire(WRITE)

    # A write-scoped throttle leaves reads alone.
    assert slept_for_read == 0
    assert sum(clock.slept) == pytest.approx(2.0)


def test_an_application_scoped_429_pauses_the_app_in_every_tenant(
    fake_redis: redis.Redis, clock: FakeClock
) -> None:
    new_budget(fake_redis, clock).pause(3.0, f"Application/ReadWrite/{APP_ID}/{TENANT_ID}")

    new_budget(fake_redis, clock, tenant_id=OTHER_TENANT_ID).acquire(READ)

    assert sum(clock.slept) == pytest.approx(3.0)


def test_a_429_without_scope_or_retry_after_still_pauses_everyone(
    fake_redis: redis.Redis, clock: FakeClock
) -> None:
    told = new_client(new_budget(fake_redis, clock), FakeTransport([graph_error(429, "x")]))

    with pytest.raises(ThrottledError):
        told.request("GET", f"/users/{UID}")
    new_budget(fake_redis, clock).acquire(READ)

    assert sum(clock.slept) > 0


def test_a_wait_longer_than_a_worker_sleeps_is_handed_back_in_seconds(
    fake_redis: redis.Redis, clock: FakeClock
) -> None:
    budget = new_budget(fake_redis, clock, max_wait_s=5.0)
    budget.pause(30.0)

    with pytest.raises(BudgetExhaustedError) as raised:
        budget.acquire(READ)

    assert raised.value.retry_after_s == pytest.approx(30.0)
    assert clock.slept == []


def test_a_shorter_pause_never_cuts_a_longer_one_short(
    fake_redis: redis.Redis, clock: FakeClock
) -> None:
    budget = new_budget(fake_redis, clock, max_wait_s=5.0)
    budget.pause(30.0)
    new_budget(fake_redis, clock).pause(1.0)

    with pytest.raises(BudgetExhaustedError) as raised:
        budget.acquire(READ)

    assert raised.value.retry_after_s == pytest.approx(30.0)


def test_a_client_hands_a_long_budget_wait_back_to_its_caller(
    fake_redis: redis.Redis, clock: FakeClock
) -> None:
    budget = new_budget(fake_redis, clock)
    budget.pause(30.0)
    before, after = budget_hooks(budget)
    transport = FakeTransport([])
    client = GraphClient(
        GRAPH_URL,
        FakeTokens(),
        session=transport.session(),
        before_request=before,
        after_response=after,
    )

    with pytest.raises(BudgetExhaustedError) as raised:
        client.request("GET", f"/users/{UID}")

    assert raised.value.retry_after_s is not None and raised.value.retry_after_s >= 30.0
    assert transport.requests == []


def test_a_spent_budget_waits_until_the_oldest_unit_leaves_the_window(
    fake_redis: redis.Redis, clock: FakeClock
) -> None:
    budget = new_budget(fake_redis, clock, writes_per_window=3, write_window_s=4.0)
    for _ in range(3):
        budget.acquire(WRITE)
        clock.advance(0.5)

    budget.acquire(WRITE)

    assert sum(clock.slept) == pytest.approx(4.0 + WINDOW_MARGIN_S - 1.5)
    assert budget.usage().writes == 3


def test_low_priority_work_leaves_headroom_for_interactive_requests(
    fake_redis: redis.Redis, clock: FakeClock
) -> None:
    budget = new_budget(fake_redis, clock, ru_per_window=10, low_priority_share=0.9)
    for _ in range(9):
        budget.acquire(READ, Priority.LOW)

    with pytest.raises(BudgetExhaustedError):
        budget.acquire(READ, Priority.LOW)
    budget.acquire(READ, Priority.NORMAL)

    assert clock.slept == []
    assert budget.usage().ru == 10


def test_graph_counting_more_than_we_sent_slows_every_worker_down(
    fake_redis: redis.Redis, clock: FakeClock
) -> None:
    budget = new_budget(fake_redis, clock, ru_per_window=100)
    warned = Reply(200, {"id": UID}, {"x-ms-throttle-limit-percentage": "0.90"})
    new_client(budget, FakeTransport([warned])).request("GET", f"/users/{UID}")
    other_worker = new_budget(fake_redis, clock, ru_per_window=100)

    # We sent 1% of the budget, Graph counts 90%: 89% is someone else's; about 11% is left.
    other_worker.acquire(Cost(10))
    with pytest.raises(BudgetExhaustedError):
        other_worker.acquire(Cost(1))


def test_graph_counting_what_we_sent_does_not_slow_us_down(
    fake_redis: redis.Redis, clock: FakeClock
) -> None:
    budget = new_budget(fake_redis, clock, ru_per_window=100)
    budget.acquire(Cost(84))
    warned = Reply(200, {"id": UID}, {"x-ms-throttle-limit-percentage": "0.85"})
    new_client(budget, FakeTransport([warned])).request("GET", f"/users/{UID}")

    budget.acquire(Cost(15))

    assert clock.slept == []


def test_the_budget_lives_in_redis_under_the_app_and_tenant(
    fake_redis: redis.Redis, clock: FakeClock
) -> None:
    budget = new_budget(fake_redis, clock)
    budget.acquire(WRITE)
    budget.pause(1.0, WRITE_SCOPE)

    stored = {key.decode() if isinstance(key, bytes) else key for key in fake_redis.keys("*")}
    assert stored == {
        keys.graph_usage_log(APP_ID, TENANT_ID, "ru"),
        keys.graph_usage_log(APP_ID, TENANT_ID, "writes"),
        keys.graph_pause(APP_ID, TENANT_ID, "write"),
    }
    assert all(f"{{{APP_ID}}}:{TENANT_ID}:" in key for key in stored)


def test_the_redis_clock_is_used_when_none_is_given(fake_redis: redis.Redis) -> None:
    budget = Budget(fake_redis, APP_ID, TENANT_ID, ru_per_window=1)
    budget.acquire(READ)

    with pytest.raises(BudgetExhaustedError) as raised:
        budget.acquire(READ)

    assert raised.value.retry_after_s == pytest.approx(10.0 + WINDOW_MARGIN_S, abs=0.5)


def test_a_budget_from_settings_needs_the_app_and_tenant(fake_redis: redis.Redis) -> None:
    configured = Settings(client_id=APP_ID, tenant_id=TENANT_ID, writes_per_window=7)

    assert Budget.from_settings(fake_redis, configured).writes_per_window == 7
    with pytest.raises(ValueError, match="ENTRAFLOW_CLIENT_ID"):
        Budget.from_settings(fake_redis, Settings(client_id=None, tenant_id=None))
