"""Injected faults: counted and sampled errors, ambiguous writes, raw Retry-After values, delays."""

from __future__ import annotations

import time
from collections.abc import Iterator
from email.utils import formatdate

import pytest
import requests
from sandbox_fixtures import AppClient, FakeClock, fetch_token, ref_url

from sandbox.app import SandboxApp
from sandbox.directory import DEMO_GROUPS, DEMO_USERS
from sandbox.server import SandboxServer

FALCON = DEMO_GROUPS["falcon"]
ADELE = DEMO_USERS["adele"]
MEMBER_REF = r"/members/\$ref$"
SLOW_S = 1.0
CLIENT_TIMEOUT_S = 0.2


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def app(clock: FakeClock) -> SandboxApp:
    return SandboxApp(clock=clock, sleep=clock.sleep)


@pytest.fixture
def client(app: SandboxApp) -> AppClient:
    return AppClient(app)


def test_a_counted_fault_hits_the_next_n_matching_requests(
    app: SandboxApp, client: AppClient
) -> None:
    app.add_fault(path_regex=r"/users/", method="GET", status=503, count=2)

    statuses = [client.get(f"/users/{ADELE.id}").status for _ in range(3)]

    assert statuses == [503, 503, 200]
    assert app.stats()["fault_hits"] == 2


def test_a_fault_answers_in_graphs_envelope_with_its_code(
    app: SandboxApp, client: AppClient
) -> None:
    app.add_fault(path_regex="/users/", status=403, count=1)

    response = client.get(f"/users/{ADELE.id}")

    error = response.json()["error"]
    assert error["code"] == "Authorization_RequestDenied"
    assert error["innerError"]["request-id"] == response.headers["request-id"]


def test_a_fault_only_hits_its_method(app: SandboxApp, client: AppClient) -> None:
    app.add_fault(path_regex=MEMBER_REF, method="POST", status=503, count=1)

    assert client.get(f"/groups/{FALCON.id}/members").status == 200
    assert client.add(FALCON.id, ADELE.id).status == 503


def test_a_write_hit_by_a_fault_is_not_applied(app: SandboxApp, client: AppClient) -> None:
    app.add_fault(path_regex=MEMBER_REF, status=503, count=1)

    assert client.add(FALCON.id, ADELE.id).status == 503
    assert app.directory.members(FALCON.id) == []


def test_apply_first_makes_an_ambiguous_write(app: SandboxApp, client: AppClient) -> None:
    app.add_fault(path_regex=MEMBER_REF, status=504, count=1, apply_first=True)

    response = client.add(FALCON.id, ADELE.id)

    assert response.status == 504
    assert response.json()["error"]["code"] == "GatewayTimeout"
    assert app.directory.members(FALCON.id) == [ADELE.id]
    # The honest retry now hears "already a member": the idempotent outcome.
    assert client.add(FALCON.id, ADELE.id).status == 400


def sampled_statuses(ratio: float, seed: int) -> list[int]:
    clock = FakeClock()
    app = SandboxApp(clock=clock)
    client = AppClient(app)
    app.add_fault(path_regex="/users/", status=503, ratio=ratio, duration_s=10.0, seed=seed)
    statuses = []
    for _ in range(40):
        statuses.append(client.get(f"/users/{ADELE.id}").status)
        clock.advance(0.5)
    return statuses


def test_a_ratio_fault_hits_a_repeatable_share_for_its_duration() -> None:
    statuses = sampled_statuses(0.5, seed=7)

    during, after = statuses[:20], statuses[20:]
    assert 4 <= during.count(503) <= 16
    assert set(during) == {200, 503}
    assert set(after) == {200}
    assert sampled_statuses(0.5, seed=7) == statuses
    assert sampled_statuses(0.5, seed=8) != statuses


@pytest.mark.parametrize("raw", ["2", "0.5", formatdate(time.time() + 30, usegmt=True)])
def test_retry_after_is_sent_exactly_as_given(app: SandboxApp, client: AppClient, raw: str) -> None:
    app.add_fault(path_regex="/users/", status=429, retry_after=raw, count=1)

    response = client.get(f"/users/{ADELE.id}")

    assert response.status == 429
    assert response.headers["Retry-After"] == raw


def test_a_fault_may_send_no_retry_after(app: SandboxApp, client: AppClient) -> None:
    app.add_fault(path_regex="/users/", status=429, count=1)

    response = client.get(f"/users/{ADELE.id}")

    assert response.status == 429
    assert "Retry-After" not in response.headers


@pytest.mark.parametrize(
    ("raw", "early_at_s", "patient_at_s"),
    # The HTTP date is made when the test runs, not when it is collected: it is wall-clock time.
    [("2", 1.0, 2.0), ("0.5", 0.25, 0.5), ("in 30 s", 1.0, 31.0)],
    ids=["seconds", "fractional", "http-date"],
)
def test_a_request_before_a_faults_retry_after_is_an_early_retry(
    app: SandboxApp,
    client: AppClient,
    clock: FakeClock,
    raw: str,
    early_at_s: float,
    patient_at_s: float,
) -> None:
    if raw == "in 30 s":
        raw = formatdate(time.time() + 30, usegmt=True)
    app.add_fault(path_regex="/users/", status=429, retry_after=raw, count=1)
    client.get(f"/users/{ADELE.id}")
    started = clock.now

    clock.now = started + early_at_s
    assert client.get(f"/users/{ADELE.id}").status == 200  # the fault is spent: only counted
    clock.now = started + patient_at_s
    client.get(f"/users/{ADELE.id}")

    assert app.stats()["early_retries"] == 1


def test_a_delay_only_fault_stalls_then_answers_normally(
    app: SandboxApp, client: AppClient, clock: FakeClock
) -> None:
    app.add_fault(path_regex=MEMBER_REF, delay_s=5.0, count=1)

    response = client.add(FALCON.id, ADELE.id)

    assert response.status == 204
    assert clock.slept == [5.0]


def test_faults_hit_batch_parts_on_their_own(app: SandboxApp, client: AppClient) -> None:
    app.add_fault(path_regex=MEMBER_REF, status=503, count=1)
    parts = [
        {
            "id": str(n),
            "method": "POST",
            "url": f"/groups/{FALCON.id}/members/$ref",
            "headers": {"Content-Type": "application/json"},
            "body": {"@odata.id": ref_url(user.id)},
        }
        for n, user in enumerate((ADELE, DEMO_USERS["megan"]))
    ]

    response = client.request("POST", "/$batch", {"requests": parts})

    assert [p["status"] for p in response.json()["responses"]] == [503, 204]
    assert app.directory.members(FALCON.id) == [DEMO_USERS["megan"].id]


def test_clearing_faults_ends_them(app: SandboxApp, client: AppClient) -> None:
    app.add_fault(path_regex="/users/", status=503)

    assert client.get(f"/users/{ADELE.id}").status == 503
    assert app.clear_faults() == 1
    assert client.get(f"/users/{ADELE.id}").status == 200


def test_faults_can_hit_the_token_endpoint(app: SandboxApp) -> None:
    app.add_fault(path_regex="/oauth2/", status=503, count=1)

    with pytest.raises(KeyError):
        app.issue_token()
    assert app.issue_token()


@pytest.fixture
def server() -> Iterator[SandboxServer]:
    with SandboxServer() as running:
        yield running


def test_faults_over_http_and_a_delay_that_times_the_client_out(server: SandboxServer) -> None:
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {fetch_token(session, server.url)}"
        added = session.post(
            f"{server.url}/_sandbox/faults",
            json={"path_regex": MEMBER_REF, "method": "POST", "delay_s": SLOW_S, "count": 1},
        )
        assert added.status_code == 201
        assert session.get(f"{server.url}/_sandbox/faults").json()["faults"][0]["count"] == 1

        with pytest.raises(requests.Timeout):
            session.post(
                f"{server.graph_url}/groups/{FALCON.id}/members/$ref",
                json={"@odata.id": ref_url(ADELE.id)},
                timeout=CLIENT_TIMEOUT_S,
            )

        # The write was made before the stall: the client timed out on a done change.
        assert server.app.directory.members(FALCON.id) == [ADELE.id]
        assert session.get(f"{server.url}/_sandbox/faults").json()["faults"][0]["hits"] == 1
        assert session.delete(f"{server.url}/_sandbox/faults").json() == {"cleared": 1}
        assert session.get(f"{server.url}/_sandbox/faults").json() == {"faults": []}


def test_a_fault_without_a_path_regex_is_refused(server: SandboxServer) -> None:
    response = requests.post(f"{server.url}/_sandbox/faults", json={"status": 503}, timeout=5)

    assert response.status_code == 400
