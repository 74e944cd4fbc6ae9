"""The Graph client against a fake transport: the wire, tokens, errors and retries."""

from __future__ import annotations

import uuid

import pytest
import requests
from fake_transport import FakeTokens, FakeTransport, Recorded, Reply, graph_error
from oauthlib.oauth2 import BackendApplicationClient
from pydantic import SecretStr
from requests_oauthlib import OAuth2Session

from entraflow.settings import Settings
from worker import retry
from worker.addressing import mail_filter, member_ref_path, user_path
from worker.errors import (
    AuthenticationError,
    GraphConnectionError,
    NotFoundError,
    PermanentGraphError,
    ServiceUnavailableError,
    ThrottledError,
)
from worker.graph import GraphClient, pooled_session
from worker.retry import RETRY_AFTER_JITTER_MAX_S, RetryPolicy

GRAPH_URL = "https://graph.microsoft.com/v1.0"
GID = "0b5e3f43-7c2f-4f4a-9d6e-2a1b3c4d5e6f"
UID = "6f5e4d3c-2b1a-4e9d-a4f7-2c7f3e5b0b11"


# Retry waits are recorded instead of slept (the conftest fixture).
pytestmark = pytest.mark.usefixtures("no_sleeping")


def client_with(
    transport: FakeTransport, tokens: FakeTokens | None = None, **options: object
) -> GraphClient:
    return GraphClient(
        GRAPH_URL,
        tokens or FakeTokens(),
        session=transport.session(),
        **options,  # type: ignore[arg-type]
    )


def test_a_request_carries_token_accept_and_a_fresh_client_request_id() -> None:
    transport = FakeTransport([Reply(200, {"id": UID}), Reply(200, {"id": UID})])
    client = client_with(transport)

    client.request("GET", f"/users/{UID}", params={"$select": "id"})
    client.request("GET", f"/users/{UID}", params={"$select": "id"})

    first, second = transport.requests
    assert first.url == f"{GRAPH_URL}/users/{UID}?$select=id"
    assert first.headers["Authorization"] == "Bearer token-1"
    assert first.headers["Accept"] == "application/json"
    assert "Retry-Attempt" not in first.headers
    ids = {first.headers["client-request-id"], second.headers["client-request-id"]}
    assert len(ids) == 2
    assert all(uuid.UUID(request_id) for request_id in ids)


def test_the_response_carries_data_headers_and_request_id() -> None:
    transport = FakeTransport([Reply(200, {"id": UID}, {"request-id": "r-1"}), Reply(204)])
    client = client_with(transport)

    response = client.request("GET", f"/users/{UID}")
    empty = client.request("DELETE", member_ref_path(GID, UID))

    assert (response.status, response.data, response.request_id) == (200, {"id": UID}, "r-1")
    assert response.headers["REQUEST-ID"] == "r-1"
    assert (empty.status, empty.data, empty.request_id) == (204, None, None)


@pytest.mark.parametrize(
    ("path", "params", "expected"),
    [
        (user_path("$admin@contoso.com"), None, "/users('$admin@contoso.com')"),
        (user_path("g_x.com#EXT#@contoso.com"), None, "/users/g_x.com%23EXT%23@contoso.com"),
        (
            "/users",
            {"$filter": mail_filter("o'brien+x@contoso.com"), "$select": "id,mail"},
            "/users?$filter=mail%20eq%20'o%27%27brien%2Bx%40contoso.com'&$select=id,mail",
        ),
        (member_ref_path(GID, UID), None, f"/groups/{GID}/members/{UID}/$ref"),
    ],
)
def test_paths_and_queries_go_on_the_wire_as_encoded(
    path: str, params: dict[str, str] | None, expected: str
) -> None:
    transport = FakeTransport([Reply(200, {})])

    client_with(transport).request("GET", path, params=params)

    assert transport.requests[0].url == GRAPH_URL + expected


def test_json_bodies_are_sent_as_json() -> None:
    transport = FakeTransport([Reply(204)])
    body = {"@odata.id": f"{GRAPH_URL}/directoryObjects/{UID}"}

    client_with(transport).request("POST", f"/groups/{GID}/members/$ref", json=body)

    assert transport.requests[0].json() == body
    assert transport.requests[0].headers["Content-Type"] == "application/json"


def test_a_401_refreshes_the_token_once_and_resends() -> None:
    tokens = FakeTokens()
    transport = FakeTransport(
        [graph_error(401, "InvalidAuthenticationToken", "expired"), Reply(200, {"id": UID})]
    )

    response = client_with(transport, tokens).request("GET", f"/users/{UID}")

    assert response.data == {"id": UID}
    assert tokens.calls == [None, "token-1"]
    assert [r.headers["Authorization"] for r in transport.requests] == [
        "Bearer token-1",
        "Bearer token-2",
    ]


def test_a_token_refused_after_a_renewal_is_renewed_once_more() -> None:
    # Another thread fetched token-2 before Graph revoked tokens: it is refused too.
    tokens = FakeTokens()
    transport = FakeTransport(
        [graph_error(401, "InvalidAuthenticationToken", "expired")] * 2 + [Reply(200, {"id": UID})]
    )

    response = client_with(transport, tokens).request("GET", f"/users/{UID}")

    assert response.data == {"id": UID}
    assert tokens.calls == [None, "token-1", "token-2"]


def test_a_third_401_is_an_authentication_error() -> None:
    tokens = FakeTokens()
    transport = FakeTransport(
        [graph_error(401, "InvalidAuthenticationToken", "expired", request_id="r-3")] * 3
    )

    with pytest.raises(AuthenticationError) as raised:
        client_with(transport, tokens).request("GET", f"/users/{UID}")

    assert len(transport.requests) == 3
    assert tokens.calls == [None, "token-1", "token-2"]
    assert raised.value.request_id == "r-3"
    assert "token-" not in str(raised.value)


def test_a_429_waits_retry_after_then_retries_with_retry_attempt() -> None:
    transport = FakeTransport(
        [
            graph_error(429, "TooManyRequests", "slow down", headers={"Retry-After": "2"}),
            Reply(200, {"id": UID}),
        ]
    )

    client_with(transport).request("GET", f"/users/{UID}")

    (wait_s,) = retry.recorded_waits_s()
    assert 2.0 <= wait_s <= 2.0 + RETRY_AFTER_JITTER_MAX_S
    first, second = transport.requests
    assert second.headers["Retry-Attempt"] == "1"
    assert first.headers["client-request-id"] == second.headers["client-request-id"]


def test_each_retry_numbers_itself() -> None:
    transport = FakeTransport([graph_error(503, "serviceNotAvailable", "down")] * 3)
    transport.queue(Reply(200, {}))

    client_with(transport, retry_policy=RetryPolicy(max_inprocess_wait_s=10)).request("GET", "/x")

    assert [r.headers.get("Retry-Attempt") for r in transport.requests] == [None, "1", "2", "3"]


def test_a_long_retry_after_is_handed_back_without_sleeping() -> None:
    transport = FakeTransport(
        [graph_error(429, "TooManyRequests", "slow down", headers={"Retry-After": "60"})]
    )

    with pytest.raises(ThrottledError) as raised:
        client_with(transport).request("GET", f"/users/{UID}")

    assert len(transport.requests) == 1
    assert retry.recorded_waits_s() == []
    assert raised.value.retry_after_s is not None and raised.value.retry_after_s >= 60.0
    assert not raised.value.retries_exhausted


def test_transient_errors_give_up_after_the_attempts() -> None:
    transport = FakeTransport([graph_error(503, "serviceNotAvailable", "down")] * 3)
    policy = RetryPolicy(max_attempts=3, max_inprocess_wait_s=10)

    with pytest.raises(ServiceUnavailableError) as raised:
        client_with(transport, retry_policy=policy).request("GET", "/x")

    assert len(transport.requests) == 3
    assert raised.value.retries_exhausted


def test_connection_failures_are_translated_and_retried() -> None:
    failure = requests.ConnectionError("connection reset")
    transport = FakeTransport([failure, requests.ReadTimeout("slow"), Reply(200, {})])

    assert client_with(transport).request("GET", "/x").status == 200
    assert len(transport.requests) == 3


def test_a_connection_failure_that_persists_is_a_graph_connection_error() -> None:
    failure = requests.ConnectionError("connection refused")
    transport = FakeTransport([failure] * 2)

    with pytest.raises(GraphConnectionError) as raised:
        client_with(transport, retry_policy=RetryPolicy(max_attempts=2)).request("GET", "/x")

    assert raised.value.__cause__ is failure
    assert raised.value.status is None


def test_permanent_errors_are_not_retried() -> None:
    transport = FakeTransport([graph_error(404, "Request_ResourceNotFound", "gone")])

    with pytest.raises(NotFoundError):
        client_with(transport).request("GET", f"/users/{UID}")

    assert len(transport.requests) == 1


def test_redirects_are_not_followed() -> None:
    transport = FakeTransport([Reply(302, headers={"Location": "https://evil.example.com/"})])

    with pytest.raises(PermanentGraphError):
        client_with(transport).request("GET", "/x")

    assert len(transport.requests) == 1


def test_get_all_follows_next_links() -> None:
    next_link = f"{GRAPH_URL}/groups/{GID}/members?$select=id&$skiptoken=X%2B1"
    transport = FakeTransport(
        [
            Reply(200, {"value": [{"id": "a"}, {"id": "b"}], "@odata.nextLink": next_link}),
            Reply(200, {"value": [{"id": "c"}]}),
        ]
    )

    items = list(
        client_with(transport).get_all(f"/groups/{GID}/members", {"$select": "id", "$top": "999"})
    )

    assert [item["id"] for item in items] == ["a", "b", "c"]
    assert [r.url for r in transport.requests] == [
        f"{GRAPH_URL}/groups/{GID}/members?$select=id&$top=999",
        next_link,
    ]


def test_get_all_refuses_a_next_link_to_another_host() -> None:
    transport = FakeTransport(
        [Reply(200, {"value": [{"id": "a"}], "@odata.nextLink": "https://evil.example.com/x"})]
    )

    with pytest.raises(PermanentGraphError, match="nextLink"):
        list(client_with(transport).get_all("/users"))

    assert len(transport.requests) == 1


def test_hooks_see_every_send_and_every_answer() -> None:
    sent: list[tuple[str, str]] = []
    answered: list[int] = []
    transport = FakeTransport(
        [graph_error(401, "InvalidAuthenticationToken", "expired"), Reply(204)]
    )
    client = client_with(
        transport,
        before_request=lambda method, path: sent.append((method, path)),
        after_response=lambda response: answered.append(response.status_code),
    )

    client.request("DELETE", member_ref_path(GID, UID))

    assert sent == [("DELETE", f"/groups/{GID}/members/{UID}/$ref")] * 2
    assert answered == [401, 204]


def test_from_settings_builds_a_working_client() -> None:
    transport = FakeTransport(
        handler=lambda request: (
            Reply(200, {"token_type": "Bearer", "expires_in": 3599, "access_token": "tok"})
            if "oauth2" in request.url
            else Reply(200, {"id": UID}, {"request-id": "r-9"})
        )
    )

    def token_session(client: BackendApplicationClient) -> OAuth2Session:
        session = OAuth2Session(client=client)
        transport.mount_on(session)
        return session

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        tenant_id="contoso.onmicrosoft.com",
        client_id="app",
        client_secret=SecretStr("secret"),
        http_timeout_s=9.0,
    )
    client = GraphClient.from_settings(
        settings, session=transport.session(), token_session_factory=token_session
    )

    assert client.request("GET", f"/users/{UID}").request_id == "r-9"
    token_request, graph_request = transport.requests
    assert token_request.url.startswith("https://login.microsoftonline.com/")
    assert graph_request.headers["Authorization"] == "Bearer tok"
    assert graph_request.timeout == 9.0


def test_requests_record_the_timeout() -> None:
    transport = FakeTransport([Reply(200, {})])

    client_with(transport, timeout_s=4.0).request("GET", "/x")

    recorded: Recorded = transport.requests[0]
    assert recorded.timeout == 4.0


def test_the_session_takes_the_proxy_for_graph_from_the_environment_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "graph.microsoft.us")

    proxied = pooled_session("https://graph.microsoft.com/v1.0")
    bypassed = pooled_session("https://graph.microsoft.us/v1.0")

    assert proxied.proxies.get("https") == "http://127.0.0.1:9"
    assert "https" not in bypassed.proxies
    # Not read again for every request: the environment was read above.
    assert proxied.trust_env is False
