"""At most a few writes to one group in flight: the sandbox's 503 past them, our slots before."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest
import redis

from entraflow.settings import Settings, get_settings
from sandbox.config import SandboxConfig
from sandbox.directory import DEMO_GROUPS, bulk_user_id
from sandbox.server import SandboxServer
from worker.actions import run_action
from worker.graph import GraphClient
from worker.group_writes import GroupBusyError, GroupWriteSlots, written_groups

GROUP = DEMO_GROUPS["falcon"].id
OTHER_GROUP = DEMO_GROUPS["sales"].id
# Writes sent at once to one group, and how many the sandbox answers at once.
WRITERS = 8
GROUP_LIMIT = 2
LATENCY_S = 0.2


@pytest.mark.parametrize(
    ("method", "target", "body", "groups"),
    [
        ("PATCH", f"/groups/{GROUP.upper()}", {"members@odata.bind": []}, [GROUP]),
        ("POST", f"/groups/{GROUP}/members/$ref", {}, [GROUP]),
        ("DELETE", f"/groups/{GROUP}/members/{bulk_user_id(1)}/$ref", None, [GROUP]),
        ("GET", f"/groups/{GROUP}/members", None, []),
        ("PATCH", f"/users/{bulk_user_id(1)}", {}, []),
        (
            "POST",
            "/$batch",
            {
                "requests": [
                    {"id": "1", "method": "DELETE", "url": f"/groups/{OTHER_GROUP}/members/x/$ref"},
                    {"id": "2", "method": "DELETE", "url": f"groups/{GROUP}/members/y/$ref"},
                    {"id": "3", "method": "GET", "url": f"/groups/{bulk_user_id(9)}"},
                    {"id": "4", "method": "DELETE", "url": f"/groups/{GROUP}/members/z/$ref"},
                    "not a part",
                ]
            },
            sorted([GROUP, OTHER_GROUP]),
        ),
        ("POST", "/$batch", {"requests": "none"}, []),
    ],
)
def test_the_groups_a_request_writes_to(
    method: str, target: str, body: object, groups: list[str]
) -> None:
    assert written_groups(method, target, body) == groups


def slots(client: redis.Redis, *, per_group: int = 2, lease_s: float = 30.0) -> GroupWriteSlots:
    return GroupWriteSlots(
        client, "app", "tenant", per_group=per_group, lease_s=lease_s, max_wait_s=0.2
    )


def test_a_group_with_every_slot_taken_makes_the_next_write_wait_then_give_up(
    redis_client: redis.Redis,
) -> None:
    shared = slots(redis_client)
    with ExitStack() as held:
        held.enter_context(shared.holding([GROUP]))
        held.enter_context(shared.holding([GROUP, OTHER_GROUP]))
        with pytest.raises(GroupBusyError), shared.holding([OTHER_GROUP, GROUP]):
            pass
        # Nothing of the refused request was taken: the other group still has a slot free.
        with shared.holding([OTHER_GROUP]):
            pass
    with shared.holding([GROUP]), shared.holding([GROUP]):
        pass


def test_a_slot_whose_holder_died_is_free_again_at_the_end_of_its_lease(
    redis_client: redis.Redis,
) -> None:
    shared = slots(redis_client, per_group=1, lease_s=0.3)
    # Entered and never left, as by a worker killed mid-request (kept, or collecting it leaves).
    abandoned = shared.holding([GROUP])
    abandoned.__enter__()
    with pytest.raises(GroupBusyError), shared.holding([GROUP]):
        pass

    time.sleep(0.35)

    with shared.holding([GROUP]):
        pass


@pytest.fixture
def sandbox_server() -> Iterator[SandboxServer]:
    """A sandbox answering in 200 ms that takes only two writes to one group at once."""
    config = SandboxConfig(
        bulk_users=WRITERS, latency_s=LATENCY_S, max_group_writes_in_flight=GROUP_LIMIT
    )
    server = SandboxServer(config).start()
    yield server
    server.stop()


def add_everyone_at_once(client: GraphClient) -> list[str]:
    def add(n: int) -> str:
        inputs = {"user_id": bulk_user_id(n), "group_id": GROUP}
        return str(run_action(client, "add_user_to_group", inputs).output["outcome"])

    with ThreadPoolExecutor(WRITERS) as threads:
        return list(threads.map(add, range(1, WRITERS + 1)))


@pytest.mark.integration
def test_threads_sharing_the_group_slots_never_meet_the_groups_503(
    entra: Settings,
    sandbox_server: SandboxServer,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENTRAFLOW_MAX_WRITES_PER_GROUP", str(GROUP_LIMIT))
    get_settings.cache_clear()
    client = GraphClient.from_settings(get_settings(), budget_redis=redis_client)

    assert add_everyone_at_once(client) == ["added"] * WRITERS

    stats = sandbox_server.app.stats()
    assert stats["busy_group_refusals"] == 0
    assert stats["members_added"] == WRITERS


@pytest.mark.integration
def test_without_slots_the_same_writes_meet_the_groups_503_and_are_retried(
    entra: Settings,
    sandbox_server: SandboxServer,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENTRAFLOW_MAX_WRITES_PER_GROUP", "0")
    get_settings.cache_clear()
    client = GraphClient.from_settings(get_settings(), budget_redis=redis_client)

    assert add_everyone_at_once(client) == ["added"] * WRITERS

    stats = sandbox_server.app.stats()
    assert stats["busy_group_refusals"] > 0
    assert stats["members_added"] == WRITERS
