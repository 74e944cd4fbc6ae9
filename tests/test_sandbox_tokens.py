"""The sandbox's token endpoint and Graph's checks of the bearer token."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
import requests
from sandbox_fixtures import AppClient, FakeClock, fetch_token, token_form

from sandbox.app import SandboxApp
from sandbox.config import SandboxConfig
from sandbox.directory import (
    DEMO_USERS,
    SANDBOX_CLIENT_ID,
    SANDBOX_CLIENT_SECRET,
    SANDBOX_TENANT_ID,
)
from sandbox.server import SandboxServer

ADELE = DEMO_USERS["adele"]


@pytest.fixture
def server() -> Iterator[SandboxServer]:
    with SandboxServer() as running:
        yield running


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as opened:
        yield opened


def token_url(server: SandboxServer, tenant: str = SANDBOX_TENANT_ID) -> str:
    return f"{server.authority_url}/{tenant}/oauth2/v2.0/token"


def test_client_credentials_issue_a_bearer_token_with_its_lifetime(
    server: SandboxServer, session: requests.Session
) -> None:
    response = session.post(token_url(server), data=token_form())

    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == body["ext_expires_in"] == 3599
    assert len(body["access_token"]) > 20


def test_the_issued_token_opens_graph(server: SandboxServer, session: requests.Session) -> None:
    token = fetch_token(session, server.url)

    response = session.get(
        f"{server.graph_url}/users/{ADELE.id}", headers={"Authorization": f"Bearer {token}"}
    )

    assert response.status_code == 200
    assert response.json()["id"] == ADELE.id


def test_http_basic_client_authentication_is_accepted(
    server: SandboxServer, session: requests.Session
) -> None:
    form = token_form(client_id="", client_secret="")

    response = session.post(
        token_url(server), data=form, auth=(SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET)
    )

    assert response.status_code == 200


def test_the_tenant_domain_works_in_place_of_the_tenant_id(
    server: SandboxServer, session: requests.Session
) -> None:
    response = session.post(token_url(server, "contoso.example"), data=token_form())

    assert response.status_code == 200


@pytest.mark.parametrize(
    ("tenant", "form", "status", "error", "aadsts"),
    [
        (SANDBOX_TENANT_ID, token_form(client_secret="wrong"), 401, "invalid_client", 7000215),
        (SANDBOX_TENANT_ID, token_form(client_secret=""), 401, "invalid_client", 7000218),
        (
            SANDBOX_TENANT_ID,
            token_form(client_id="11111111-2222-3333-4444-555555555555"),
            400,
            "unauthorized_client",
            700016,
        ),
        ("fabrikam.example", token_form(), 400, "invalid_request", 90002),
        (
            SANDBOX_TENANT_ID,
            token_form(grant_type="password"),
            400,
            "unsupported_grant_type",
            70003,
        ),
        (SANDBOX_TENANT_ID, token_form(grant_type=""), 400, "invalid_request", 900144),
        (SANDBOX_TENANT_ID, token_form(scope="User.Read.All"), 400, "invalid_scope", 1002012),
    ],
    ids=[
        "wrong-secret",
        "missing-secret",
        "unknown-client",
        "unknown-tenant",
        "unsupported-grant",
        "missing-grant",
        "scope-without-default",
    ],
)
def test_token_errors_use_entra_error_bodies(
    server: SandboxServer,
    session: requests.Session,
    tenant: str,
    form: dict[str, str],
    status: int,
    error: str,
    aadsts: int,
) -> None:
    response = session.post(
        token_url(server, tenant), data=form, headers={"client-request-id": "corr-1"}
    )

    assert response.status_code == status
    body = response.json()
    assert body["error"] == error
    assert body["error_codes"] == [aadsts]
    assert body["error_description"].startswith(f"AADSTS{aadsts}: ")
    assert body["correlation_id"] == "corr-1"
    assert body["timestamp"] and body["trace_id"]
    assert "access_token" not in body


def test_wrong_basic_auth_secret_is_invalid_client(
    server: SandboxServer, session: requests.Session
) -> None:
    credentials = base64.b64encode(f"{SANDBOX_CLIENT_ID}:nope".encode()).decode()

    response = session.post(
        token_url(server),
        data=token_form(client_id="", client_secret=""),
        headers={"Authorization": f"Basic {credentials}"},
    )

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        (None, "Access token is empty."),
        ("Bearer ", "Access token is empty."),
        ("Basic abc", "Access token is empty."),
        ("Bearer not-a-token-we-issued", "Access token validation failure."),
    ],
)
def test_graph_refuses_a_missing_or_foreign_token(
    server: SandboxServer, session: requests.Session, authorization: str | None, message: str
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}

    response = session.get(f"{server.graph_url}/users/{ADELE.id}", headers=headers)

    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "InvalidAuthenticationToken"
    assert error["message"] == message
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_token_past_its_lifetime_is_refused_as_expired() -> None:
    clock = FakeClock()
    app = SandboxApp(SandboxConfig(token_lifetime_s=60), clock=clock)
    client = AppClient(app)
    assert client.get(f"/users/{ADELE.id}").status == 200

    clock.advance(60)
    response = client.get(f"/users/{ADELE.id}")

    assert response.status == 401
    assert response.json()["error"]["message"] == "Access token has expired or is not yet valid."


def test_expiring_every_token_mid_run_forces_a_new_one(
    server: SandboxServer, session: requests.Session
) -> None:
    headers = {"Authorization": f"Bearer {fetch_token(session, server.url)}"}
    user_url = f"{server.graph_url}/users/{ADELE.id}"
    assert session.get(user_url, headers=headers).status_code == 200

    expired = session.post(f"{server.url}/_sandbox/tokens/expire")

    assert expired.json() == {"expired": 1}
    refused = session.get(user_url, headers=headers)
    assert refused.status_code == 401
    assert refused.json()["error"]["message"].startswith("Access token has expired")
    fresh = {"Authorization": f"Bearer {fetch_token(session, server.url)}"}
    assert session.get(user_url, headers=fresh).status_code == 200


def test_token_lifetime_changed_at_run_time_applies_to_new_tokens(
    server: SandboxServer, session: requests.Session
) -> None:
    session.post(f"{server.url}/_sandbox/config", json={"token_lifetime_s": 120})

    response = session.post(token_url(server), data=token_form())

    assert response.json()["expires_in"] == 120
