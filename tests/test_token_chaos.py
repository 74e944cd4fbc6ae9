"""A running process follows the stored connection: what chaos scenario 7 found, kept found.

Workers build their Graph client once per process. Before, a connection stored by
`entraflow connect` while they ran was never used by them: they went on acting as the app
(the audit log said the service account), and revoking the account's refresh token stopped
nothing. `GET /me` answers only a delegated token, so it tells which connection a client used.
"""

from __future__ import annotations

import pytest
import requests
from sqlalchemy.exc import OperationalError

from cli.sign_in import begin_sign_in, finish_sign_in
from entraflow.secrets import SecretBox
from entraflow.settings import Settings
from models.connections import delete_connection
from sandbox.directory import DEMO_USER_ID, DEMO_USERS, SANDBOX_CLIENT_ID, SANDBOX_TENANT_ID
from sandbox.server import SandboxServer
from worker import tokens
from worker.errors import AuthenticationError, BadRequestError
from worker.graph import GraphClient
from worker.tokens import CONNECTION_RECHECK_S, RECONNECT_HINT, StoredConnectionTokenProvider

SERVICE_ACCOUNT = DEMO_USERS["svc"].upn


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def connect_service_account(settings: Settings) -> None:
    """What `entraflow connect --paste` stores, the test playing the browser."""
    pending = begin_sign_in(
        settings,
        tenant_id=SANDBOX_TENANT_ID,
        client_id=SANDBOX_CLIENT_ID,
        redirect_uri="http://localhost:1/",
    )
    redirect = requests.get(pending.url, allow_redirects=False, timeout=5).headers["Location"]
    finish_sign_in(
        settings, pending, redirect, client_secret=None, box=SecretBox.from_settings(settings)
    )


def client_of(settings: Settings, clock: Clock) -> GraphClient:
    """A Graph client as a worker process keeps it, made before the test changes anything."""
    return GraphClient(settings.graph_url, StoredConnectionTokenProvider(settings, clock=clock))


def signed_in_upn(client: GraphClient) -> str:
    return str(client.request("GET", "/me").data["userPrincipalName"])


def test_a_connection_stored_while_a_client_runs_is_used_after_the_recheck_interval(
    entra: Settings,
) -> None:
    clock = Clock()
    client = client_of(entra, clock)
    client.request("GET", f"/users/{DEMO_USER_ID}")  # as the app: it holds an app-only token

    connect_service_account(entra)
    clock.now += CONNECTION_RECHECK_S

    assert signed_in_upn(client) == SERVICE_ACCOUNT


def test_a_refused_token_makes_the_client_take_up_the_new_connection_at_once(
    entra: Settings, sandbox_server: SandboxServer
) -> None:
    client = client_of(entra, Clock())
    with pytest.raises(BadRequestError):
        signed_in_upn(client)  # an app-only token has no signed-in user
    sandbox_server.app.expire_tokens()
    connect_service_account(entra)

    assert signed_in_upn(client) == SERVICE_ACCOUNT


def test_a_revoked_refresh_token_stops_a_running_client_and_disconnect_restores_the_app(
    entra: Settings, sandbox_server: SandboxServer
) -> None:
    clock = Clock()
    client = client_of(entra, clock)
    connect_service_account(entra)
    clock.now += CONNECTION_RECHECK_S
    assert signed_in_upn(client) == SERVICE_ACCOUNT

    sandbox_server.app.revoke_refresh_tokens(SERVICE_ACCOUNT)
    sandbox_server.app.expire_tokens()
    token_requests = sandbox_server.app.stats()["requests"]["POST"]["token"]
    for _ in range(3):
        with pytest.raises(AuthenticationError, match=f"broken.*AADSTS50173.*{RECONNECT_HINT}"):
            client.request("GET", f"/users/{DEMO_USER_ID}")
    refreshes_tried = sandbox_server.app.stats()["requests"]["POST"]["token"] - token_requests

    delete_connection(entra.resolved_database_url)

    assert refreshes_tried == 1
    assert client.request("GET", f"/users/{DEMO_USER_ID}").data["id"] == DEMO_USER_ID


def test_a_database_away_at_a_recheck_leaves_the_client_acting_as_before(
    entra: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    client = client_of(entra, clock)

    def database_away(_: str) -> None:
        raise OperationalError("SELECT", {}, Exception("unable to open database file"))

    monkeypatch.setattr(tokens, "load_connection", database_away)
    clock.now += CONNECTION_RECHECK_S

    assert client.request("GET", f"/users/{DEMO_USER_ID}").data["id"] == DEMO_USER_ID
