"""The `/_sandbox` controls, the stats, and the HTTP server's life cycle."""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sandbox_fixtures import AppClient, FakeClock, fetch_token, ref_url

from sandbox.app import SandboxApp
from sandbox.config import MAX_LATENCY_OVER_P99, SandboxConfig
from sandbox.directory import (
    DEMO_GROUP_ID,
    DEMO_GROUPS,
    DEMO_USER_ID,
    DEMO_USER_UPN,
    DEMO_USERS,
    bulk_user_id,
)
from sandbox.server import SandboxServer

FALCON = DEMO_GROUPS["falcon"]
ADELE = DEMO_USERS["adele"]


@pytest.fixture
def server() -> Iterator[SandboxServer]:
    with SandboxServer() as running:
        yield running


@pytest.fixture
def session(server: SandboxServer) -> Iterator[requests.Session]:
    with requests.Session() as opened:
        opened.headers["Authorization"] = f"Bearer {fetch_token(opened, server.url)}"
        yield opened


def test_the_server_publishes_its_urls(server: SandboxServer) -> None:
    assert server.url.startswith("http://127.0.0.1:")
    assert server.graph_url == server.url + "/v1.0"
    assert server.authority_url == server.url


def test_health(server: SandboxServer, session: requests.Session) -> None:
    response = session.get(f"{server.url}/_sandbox/health")

    assert response.json() == {"status": "ok"}


def test_stats_count_requests_by_method_and_kind_and_responses_by_status(
    server: SandboxServer, session: requests.Session
) -> None:
    session.get(f"{server.graph_url}/users/{ADELE.id}")
    session.get(f"{server.graph_url}/users/{ADELE.id}")
    session.post(
        f"{server.graph_url}/groups/{FALCON.id}/members/$ref", json={"@odata.id": ref_url(ADELE.id)}
    )
    session.delete(f"{server.graph_url}/groups/{FALCON.id}/members/{ADELE.id}/$ref")
    session.get(f"{server.graph_url}/nowhere")

    stats = session.get(f"{server.url}/_sandbox/stats").json()

    assert stats["requests"] == {
        "POST": {"token": 1, "member_add": 1},
        "GET": {"user": 2, "unknown": 1},
        "DELETE": {"member_remove": 1},
    }
    assert stats["requests_total"] == 6
    assert stats["responses"] == {"200": 3, "204": 2, "400": 1}
    assert stats["members_added"] == stats["members_removed"] == 1
    assert stats["writes_applied"] == 2
    assert stats["users_deleted"] == stats["throttled"] == stats["early_retries"] == 0
    assert stats["ru_charged"] == 5


def test_reset_restores_the_seed_and_clears_stats_faults_and_config(
    server: SandboxServer, session: requests.Session
) -> None:
    session.post(
        f"{server.graph_url}/groups/{FALCON.id}/members/$ref", json={"@odata.id": ref_url(ADELE.id)}
    )
    session.delete(f"{server.graph_url}/groups/{DEMO_GROUPS['sales'].id}/members/{ADELE.id}")
    session.post(f"{server.url}/_sandbox/faults", json={"path_regex": "/users/", "status": 503})
    session.post(f"{server.url}/_sandbox/config", json={"ru_per_window": 1})

    assert session.post(f"{server.url}/_sandbox/reset").json() == {"status": "reset"}

    assert server.app.directory.members(FALCON.id) == []
    assert server.app.directory.user(ADELE.id) is not None
    assert server.app.stats()["requests_total"] == 0
    assert session.get(f"{server.url}/_sandbox/faults").json() == {"faults": []}
    assert server.app.config.ru_per_window == SandboxConfig().ru_per_window
    # Tokens survive a reset, so a running client carries on.
    assert session.get(f"{server.graph_url}/users/{ADELE.id}").status_code == 200


def test_config_changes_at_run_time(server: SandboxServer, session: requests.Session) -> None:
    response = session.post(
        f"{server.url}/_sandbox/config",
        json={
            "writes_per_window": 5,
            "write_window_s": 30,
            "latency_s": 0,
            "patch_write_cost": "member",
        },
    )

    assert response.status_code == 200
    config = session.get(f"{server.url}/_sandbox/config").json()
    assert config["writes_per_window"] == 5
    assert config["write_window_s"] == 30.0
    assert config["patch_write_cost"] == "member"


@pytest.mark.parametrize(
    "change",
    [
        {"bulk_users": 10},
        {"tenant_id": "x"},
        {"patch_write_cost": "sometimes"},
        {"ru_per_window": "many"},
        {"ru_per_window": 0},
        {"latency_s": -1},
        {"latency_s": 0.2, "latency_p99_s": 0.1},
    ],
)
def test_config_refuses_what_cannot_change_at_run_time(
    server: SandboxServer, session: requests.Session, change: dict[str, object]
) -> None:
    response = session.post(f"{server.url}/_sandbox/config", json=change)

    assert response.status_code == 400
    assert "error" in response.json()


def test_membership_state_is_readable_over_http(
    server: SandboxServer, session: requests.Session
) -> None:
    response = session.get(f"{server.url}/_sandbox/groups/{DEMO_GROUPS['sales'].id}/members")

    assert response.json() == {"members": [ADELE.id]}


def test_unknown_paths_are_404(server: SandboxServer, session: requests.Session) -> None:
    assert session.get(f"{server.url}/_sandbox/nothing").status_code == 404
    assert session.get(f"{server.url}/elsewhere").status_code == 404


def test_latency_is_added_to_graph_requests_only() -> None:
    clock = FakeClock()
    app = SandboxApp(SandboxConfig(latency_s=0.25), clock=clock, sleep=clock.sleep)
    client = AppClient(app)

    client.get(f"/users/{ADELE.id}")
    app.handle("GET", "/_sandbox/health", {})

    assert clock.slept == [0.25]


def test_latency_with_a_spread_has_the_median_and_99th_percentile_asked_for() -> None:
    config = SandboxConfig(latency_s=0.2, latency_p99_s=0.5)
    rng = random.Random(17)

    samples = sorted(config.sampled_latency_s(rng) for _ in range(20_000))

    assert statistics.median(samples) == pytest.approx(0.2, rel=0.03)
    assert samples[int(0.99 * len(samples))] == pytest.approx(0.5, rel=0.06)
    assert samples[0] > 0 and samples[-1] <= MAX_LATENCY_OVER_P99 * 0.5


def test_latency_without_a_spread_is_the_same_for_every_request() -> None:
    rng = random.Random(17)

    assert {SandboxConfig(latency_s=0.2).sampled_latency_s(rng) for _ in range(100)} == {0.2}
    assert SandboxConfig(latency_p99_s=0.5).sampled_latency_s(rng) == 0.0


def test_each_graph_request_sleeps_a_latency_of_its_own() -> None:
    clock = FakeClock()
    config = SandboxConfig(latency_s=0.2, latency_p99_s=0.5)
    app = SandboxApp(config, clock=clock, sleep=clock.sleep, rng=random.Random(5))
    client = AppClient(app)

    for _ in range(3):
        client.get(f"/users/{ADELE.id}")

    expected = random.Random(5)
    assert clock.slept == [config.sampled_latency_s(expected) for _ in range(3)]
    assert len(set(clock.slept)) == 3


def test_the_demo_user_is_not_yet_in_the_demo_group() -> None:
    app = SandboxApp()

    user = app.directory.user(DEMO_USER_UPN)

    assert user is not None and user["id"] == DEMO_USER_ID
    assert not app.directory.is_member(DEMO_GROUP_ID, DEMO_USER_ID)


def test_seeded_ids_are_stable_across_instances() -> None:
    assert SandboxApp().directory.members(FALCON.id) == SandboxApp().directory.members(FALCON.id)
    assert SandboxApp(SandboxConfig(bulk_users=3)).directory.user("user3@contoso.example")


def test_stop_ends_keep_alive_connections_and_frees_the_port() -> None:
    server = SandboxServer().start()
    host, port = server.url.removeprefix("http://").split(":")
    with requests.Session() as session:
        assert session.get(f"{server.url}/_sandbox/health").status_code == 200

        server.stop()

        with pytest.raises(requests.ConnectionError):
            session.get(f"http://{host}:{port}/_sandbox/health", timeout=2)
    with SandboxServer(port=int(port)) as again:
        assert again.url == f"http://{host}:{port}"


def test_a_server_cannot_be_started_twice() -> None:
    with SandboxServer() as server, pytest.raises(RuntimeError):
        server.start()


def test_a_fixed_port_is_known_before_the_server_starts() -> None:
    assert SandboxServer(port=8765).graph_url == "http://127.0.0.1:8765/v1.0"
    with pytest.raises(RuntimeError):
        _ = SandboxServer().url


def test_concurrent_clients_over_keep_alive_connections_lose_no_write() -> None:
    threads, per_thread = 8, 20
    with SandboxServer(SandboxConfig(bulk_users=threads * per_thread)) as server:
        with requests.Session() as session:
            token = fetch_token(session, server.url)

        def add_slice(first: int) -> list[int]:
            with requests.Session() as session:
                session.headers["Authorization"] = f"Bearer {token}"
                return [
                    session.post(
                        f"{server.graph_url}/groups/{FALCON.id}/members/$ref",
                        json={"@odata.id": ref_url(bulk_user_id(n))},
                    ).status_code
                    for n in range(first, first + per_thread)
                ]

        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(add_slice, range(1, threads * per_thread, per_thread)))

        assert {status for statuses in results for status in statuses} == {204}
        assert sorted(server.app.directory.members(FALCON.id)) == sorted(
            bulk_user_id(n) for n in range(1, threads * per_thread + 1)
        )
        assert server.app.stats()["members_added"] == threads * per_thread
