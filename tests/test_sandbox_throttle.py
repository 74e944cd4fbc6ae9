"""Resource-unit and write budgets per app and tenant, their headers, and early retries."""

from __future__ import annotations

import pytest
from sandbox_fixtures import AppClient, FakeClock, ref_url

from sandbox.app import SandboxApp
from sandbox.config import PatchWriteCost, SandboxConfig
from sandbox.directory import (
    DEMO_GROUPS,
    DEMO_USERS,
    SANDBOX_CLIENT_ID,
    SANDBOX_TENANT_ID,
    bulk_user_id,
)
from sandbox.throttle import IN_FLIGHT_S, request_cost

FALCON = DEMO_GROUPS["falcon"]
ALL_STAFF = DEMO_GROUPS["all-staff"]
ADELE = DEMO_USERS["adele"]
MAIL_FILTER = "$filter=mail%20eq%20'team@contoso.example'"


def throttled_app(**settings: object) -> tuple[SandboxApp, AppClient, FakeClock]:
    clock = FakeClock()
    app = SandboxApp(SandboxConfig(**settings), clock=clock)  # type: ignore[arg-type]
    return app, AppClient(app), clock


@pytest.mark.parametrize(
    ("target", "ru"),
    [
        (f"/users?{MAIL_FILTER}", 2),
        (f"/users?{MAIL_FILTER}&$select=id", 1),
        (f"/users/{ADELE.id}", 1),
        (f"/users/{ADELE.id}?$select=id", 1),
        (f"/groups/{ALL_STAFF.id}", 1),
        (f"/groups/{ALL_STAFF.id}/members", 3),
        (f"/groups/{ALL_STAFF.id}/members?$select=id&$top=999", 2),
        (f"/groups/{ALL_STAFF.id}/members?$top=5", 2),
        (f"/groups/{ALL_STAFF.id}/members?$select=id&$top=5", 1),
    ],
)
def test_reads_cost_what_graph_charges(target: str, ru: int) -> None:
    _, client, _ = throttled_app()

    response = client.get(target)

    assert response.status == 200
    assert response.headers["x-ms-resource-unit"] == str(ru)


def test_a_write_costs_one_resource_unit() -> None:
    _, client, _ = throttled_app()

    response = client.add(FALCON.id, ADELE.id)

    assert response.headers["x-ms-resource-unit"] == "1"


def test_cost_rules_never_go_below_one() -> None:
    assert request_cost("GET", select=True, top=5).ru == 1
    assert request_cost("GET", group_members=True, expand=True).ru == 4
    assert request_cost("DELETE").writes == 1


def test_the_resource_unit_budget_refuses_with_graphs_throttle_headers() -> None:
    app, client, _ = throttled_app(ru_per_window=10, ru_window_s=10.0)
    for _ in range(10):
        assert client.get(f"/users/{ADELE.id}").status == 200

    response = client.get(f"/users/{ADELE.id}")

    assert response.status == 429
    assert response.json()["error"]["code"] == "TooManyRequests"
    assert response.headers["Retry-After"] == "10"
    assert response.headers["x-ms-throttle-information"] == "ResourceUnitLimitExceeded"
    assert response.headers["x-ms-throttle-scope"] == (
        f"Tenant_Application/ReadWrite/{SANDBOX_CLIENT_ID}/{SANDBOX_TENANT_ID}"
    )
    assert app.stats()["throttled"] == 1
    assert app.stats()["early_retries"] == 0


def test_usage_above_80_percent_is_reported() -> None:
    _, client, _ = throttled_app(ru_per_window=10)
    headers = [client.get(f"/users/{ADELE.id}").headers for _ in range(10)]

    assert "x-ms-throttle-limit-percentage" not in headers[7]  # 8 of 10: not above 80%
    assert headers[8]["x-ms-throttle-limit-percentage"] == "0.90"
    assert headers[9]["x-ms-throttle-limit-percentage"] == "1.00"


def test_the_write_budget_refuses_writes_but_not_reads_and_applies_nothing() -> None:
    app, client, _ = throttled_app(bulk_users=4, writes_per_window=3, write_window_s=150.0)
    for n in (1, 2, 3):
        assert client.add(FALCON.id, bulk_user_id(n)).status == 204

    refused = client.add(FALCON.id, bulk_user_id(4))

    assert refused.status == 429
    assert refused.headers["Retry-After"] == "150"
    assert refused.headers["x-ms-throttle-information"] == "WriteLimitExceeded"
    assert refused.headers["x-ms-throttle-scope"].startswith("Tenant_Application/Write/")
    assert bulk_user_id(4) not in app.directory.members(FALCON.id)
    assert client.get(f"/users/{ADELE.id}").status == 200


def test_a_client_that_honours_retry_after_causes_no_early_retry() -> None:
    app, client, clock = throttled_app(ru_per_window=10, ru_window_s=10.0)
    for _ in range(10):
        client.get(f"/users/{ADELE.id}")
        clock.advance(0.5)
    refused = client.get(f"/users/{ADELE.id}")

    clock.advance(int(refused.headers["Retry-After"]))
    response = client.get(f"/users/{ADELE.id}")

    assert response.status == 200
    assert app.stats()["early_retries"] == 0


def test_retrying_before_retry_after_is_charged_refused_and_counted() -> None:
    app, client, clock = throttled_app(ru_per_window=10, ru_window_s=10.0)
    for _ in range(10):
        client.get(f"/users/{ADELE.id}")
    first = client.get(f"/users/{ADELE.id}")
    assert first.headers["Retry-After"] == "10"
    assert first.headers["x-ms-resource-unit"] == "0"

    clock.advance(5)
    early = client.get(f"/users/{ADELE.id}")

    assert early.status == 429
    assert early.headers["x-ms-resource-unit"] == "1"
    assert app.stats()["early_retries"] == 1
    assert app.stats()["ru_charged"] == 11


def test_a_request_arriving_just_after_a_429_was_in_flight_and_is_not_early() -> None:
    app, client, clock = throttled_app(ru_per_window=1, ru_window_s=10.0)
    client.get(f"/users/{ADELE.id}")
    assert client.get(f"/users/{ADELE.id}", {"client-request-id": "first"}).status == 429

    # Another worker process had sent this before the first one heard of the 429.
    clock.advance(IN_FLIGHT_S / 2)
    in_flight = client.get(f"/users/{ADELE.id}", {"client-request-id": "second"})

    assert in_flight.status == 429
    assert app.stats()["early_retries"] == 0


def test_retrying_the_throttled_request_at_once_is_early_even_within_the_flight_time() -> None:
    app, client, clock = throttled_app(ru_per_window=1, ru_window_s=10.0)
    client.get(f"/users/{ADELE.id}")
    assert client.get(f"/users/{ADELE.id}", {"client-request-id": "first"}).status == 429

    clock.advance(IN_FLIGHT_S / 2)
    client.get(f"/users/{ADELE.id}", {"client-request-id": "first"})
    clock.advance(IN_FLIGHT_S)
    client.get(f"/users/{ADELE.id}", {"client-request-id": "third"})

    assert app.stats()["early_retries"] == 2


def test_an_impatient_client_stays_throttled_while_a_patient_one_recovers() -> None:
    impatient_app, impatient, impatient_clock = throttled_app(ru_per_window=10, ru_window_s=10.0)
    statuses = []
    for _ in range(200):  # five requests a second for 40 s, whatever the answers say
        statuses.append(impatient.get(f"/users/{ADELE.id}").status)
        impatient_clock.advance(0.2)

    assert statuses[:10] == [200] * 10
    assert set(statuses[10:]) == {429}
    assert impatient_app.stats()["early_retries"] == 189

    patient_app, patient, patient_clock = throttled_app(ru_per_window=10, ru_window_s=10.0)
    done = 0
    while patient_clock.now < impatient_clock.now:
        response = patient.get(f"/users/{ADELE.id}")
        if response.status == 429:
            patient_clock.advance(int(response.headers["Retry-After"]))
        else:
            done += 1
            patient_clock.advance(0.2)
    assert done >= 40
    assert patient_app.stats()["early_retries"] == 0


@pytest.mark.parametrize(
    ("mode", "next_write"),
    [(PatchWriteCost.REQUEST, 204), (PatchWriteCost.MEMBER, 429)],
)
def test_a_twenty_member_patch_costs_one_or_twenty_writes(
    mode: PatchWriteCost, next_write: int
) -> None:
    _, client, _ = throttled_app(bulk_users=21, writes_per_window=20, patch_write_cost=mode)
    bind = [ref_url(bulk_user_id(n)) for n in range(1, 21)]
    assert (
        client.request("PATCH", f"/groups/{FALCON.id}", {"members@odata.bind": bind}).status == 204
    )

    response = client.add(FALCON.id, bulk_user_id(21))

    assert response.status == next_write


def test_budgets_changed_at_run_time_apply_to_the_next_request() -> None:
    app, client, _ = throttled_app()
    assert client.get(f"/users/{ADELE.id}").status == 200

    app.configure(ru_per_window=1)

    assert client.get(f"/users/{ADELE.id}").status == 429
