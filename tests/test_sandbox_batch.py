"""`POST /$batch`: up to 20 parts, each answered, charged and throttled on its own."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import requests
from sandbox_fixtures import AppClient, FakeClock, fetch_token, ref_url

from sandbox.app import SandboxApp
from sandbox.config import SandboxConfig
from sandbox.directory import DEMO_GROUPS, DEMO_USERS, bulk_user_id
from sandbox.server import SandboxServer

FALCON = DEMO_GROUPS["falcon"]
SALES = DEMO_GROUPS["sales"]
ADELE = DEMO_USERS["adele"]
JSON_HEADERS = {"Content-Type": "application/json"}


def add_part(part_id: str, group_id: str, user_id: str) -> dict[str, Any]:
    return {
        "id": part_id,
        "method": "POST",
        "url": f"/groups/{group_id}/members/$ref",
        "headers": JSON_HEADERS,
        "body": {"@odata.id": ref_url(user_id)},
    }


def by_id(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {part["id"]: part for part in body["responses"]}


def test_each_part_gets_its_own_answer() -> None:
    app = SandboxApp(SandboxConfig(bulk_users=2))
    client = AppClient(app)
    parts = [
        add_part("1", FALCON.id, bulk_user_id(1)),
        add_part("2", SALES.id, ADELE.id),
        add_part("3", FALCON.id, str(uuid.uuid4())),
        {"id": "4", "method": "DELETE", "url": f"groups/{SALES.id}/members/{ADELE.id}/$ref"},
        {"id": "5", "method": "GET", "url": f"/users/{ADELE.id}?$select=id,displayName"},
    ]

    response = client.request("POST", "/$batch", {"requests": parts})

    assert response.status == 200
    answers = by_id(response.json())
    assert {k: v["status"] for k, v in answers.items()} == {
        "1": 204,
        "2": 400,
        "3": 404,
        "4": 204,
        "5": 200,
    }
    assert "body" not in answers["1"]
    assert answers["2"]["body"]["error"]["code"] == "Request_BadRequest"
    assert answers["3"]["body"]["error"]["innerError"]["request-id"]
    assert answers["5"]["body"]["displayName"] == "Adele Vance"
    assert answers["5"]["headers"]["Content-Type"] == "application/json"
    assert app.directory.members(FALCON.id) == [bulk_user_id(1)]
    assert app.directory.members(SALES.id) == []
    # 4 writes at 1 RU and one GET at 1 RU (select takes it to the minimum of 1).
    assert response.headers["x-ms-resource-unit"] == "5"
    assert app.stats()["requests"]["POST"] == {"token": 1, "batch": 1, "member_add": 3}


def test_more_than_twenty_parts_is_refused_whole() -> None:
    app = SandboxApp(SandboxConfig(bulk_users=21))
    parts = [add_part(str(n), FALCON.id, bulk_user_id(n)) for n in range(1, 22)]

    response = AppClient(app).request("POST", "/$batch", {"requests": parts})

    assert response.status == 400
    assert response.json()["error"]["code"] == "BadRequest"
    assert app.directory.members(FALCON.id) == []


@pytest.mark.parametrize(
    "payload",
    [
        {"requests": []},
        {"requests": [{"id": "1", "method": "GET"}]},
        {"requests": [{"id": "1", "method": "GET", "url": "/users"}] * 2},
        {
            "requests": [
                {"id": "1", "method": "GET", "url": "https://graph.microsoft.com/v1.0/users"}
            ]
        },
        {"requests": [{**add_part("1", FALCON.id, ADELE.id), "headers": {}}]},
        {"nothing": True},
    ],
    ids=[
        "empty",
        "no-url",
        "duplicate-id",
        "absolute-url",
        "body-without-content-type",
        "no-requests",
    ],
)
def test_a_malformed_batch_is_refused_whole(payload: dict[str, Any]) -> None:
    app = SandboxApp()

    response = AppClient(app).request("POST", "/$batch", payload)

    assert response.status == 400
    assert app.directory.members(FALCON.id) == []


def test_parts_are_throttled_one_by_one_with_their_own_retry_after() -> None:
    clock = FakeClock()
    app = SandboxApp(SandboxConfig(bulk_users=4, writes_per_window=2), clock=clock)
    parts = [add_part(str(n), FALCON.id, bulk_user_id(n)) for n in range(1, 5)]

    response = AppClient(app).request("POST", "/$batch", {"requests": parts})

    answers = by_id(response.json())
    assert [answers[str(n)]["status"] for n in range(1, 5)] == [204, 204, 429, 429]
    throttled = answers["3"]
    assert int(throttled["headers"]["Retry-After"]) > 0
    assert throttled["headers"]["x-ms-throttle-information"] == "WriteLimitExceeded"
    assert throttled["body"]["error"]["code"] == "TooManyRequests"
    assert app.directory.members(FALCON.id) == [bulk_user_id(1), bulk_user_id(2)]
    stats = app.stats()
    assert stats["throttled"] == 2
    # The 4th part was sent before the client could see the 3rd's 429: not an early retry.
    assert stats["early_retries"] == 0


def test_a_batch_sent_while_told_to_wait_counts_its_parts_as_early_retries() -> None:
    clock = FakeClock()
    app = SandboxApp(SandboxConfig(bulk_users=4, writes_per_window=1), clock=clock)
    client = AppClient(app)
    assert client.add(FALCON.id, bulk_user_id(1)).status == 204
    assert client.add(FALCON.id, bulk_user_id(2)).status == 429
    parts = [add_part(str(n), FALCON.id, bulk_user_id(n)) for n in (3, 4)]

    clock.advance(1)
    response = client.request("POST", "/$batch", {"requests": parts})

    assert [part["status"] for part in response.json()["responses"]] == [429, 429]
    assert app.stats()["early_retries"] == 2


def test_a_batch_without_a_token_is_refused_whole() -> None:
    app = SandboxApp()

    response = app.handle("POST", "/v1.0/$batch", {}, b'{"requests": []}')

    assert response.status == 401


def test_batch_over_http() -> None:
    with SandboxServer() as server, requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {fetch_token(session, server.url)}"

        response = session.post(
            f"{server.graph_url}/$batch",
            json={"requests": [add_part("a", FALCON.id, ADELE.id)]},
        )

        assert response.status_code == 200
        assert response.json()["responses"][0]["status"] == 204
        assert server.app.directory.members(FALCON.id) == [ADELE.id]
