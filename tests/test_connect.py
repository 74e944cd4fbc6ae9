"""`entraflow connect` against the sandbox over HTTP, the test playing the signing-in user."""

from __future__ import annotations

import json
import logging
import re
import threading
import webbrowser
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
import requests
from click.testing import CliRunner
from fake_transport import FakeTransport, Reply
from oauthlib.oauth2 import WebApplicationClient
from requests_oauthlib import OAuth2Session
from sqlalchemy import text

from cli import connect as connect_cli
from cli.connect import SignInOptions, sign_in
from cli.main import cli
from cli.sign_in import begin_sign_in, finish_sign_in
from entraflow.secrets import SecretBox
from entraflow.settings import Settings, get_settings
from models.connections import ConnectionStatus, load_connection
from models.db import get_engine
from sandbox.directory import (
    DEMO_USERS,
    SANDBOX_CLIENT_ID,
    SANDBOX_CLIENT_SECRET,
    SANDBOX_TENANT_ID,
)
from sandbox.server import SandboxServer
from worker.errors import AuthenticationError, GraphError, ServiceUnavailableError
from worker.graph import GraphClient
from worker.tokens import DelegatedTokenProvider

SERVICE_ACCOUNT = DEMO_USERS["svc"].upn
# How many workers refresh at once in the concurrency test.
WORKERS = 8
TRACE_ID = re.compile(r"[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}")


def play_user(url: str) -> threading.Thread:
    """Follow the authorize URL and its redirect, as a browser would, in the background."""

    def browse() -> None:
        answer = requests.get(url, allow_redirects=False, timeout=5)
        requests.get(answer.headers["Location"], timeout=5)

    thread = threading.Thread(target=browse)
    thread.start()
    return thread


def redirect_of(url: str) -> str:
    """Where the sandbox sends the browser after signing in."""
    return requests.get(url, allow_redirects=False, timeout=5).headers["Location"]


def connect_by_paste(settings: Settings) -> None:
    redirects: list[str] = []
    sign_in(
        settings,
        SignInOptions(SANDBOX_TENANT_ID, SANDBOX_CLIENT_ID, settings.client_secret, paste=True),
        show_url=lambda url: redirects.append(redirect_of(url)),
        read_pasted=lambda: redirects[0],
    )


def stored_secrets(settings: Settings) -> list[str]:
    """The plaintext tokens and secret of the stored connection."""
    stored = load_connection(settings.resolved_database_url)
    assert stored is not None
    box = SecretBox.from_settings(settings)
    ciphertexts = (
        stored.refresh_token_ciphertext,
        stored.access_token_ciphertext,
        stored.client_secret_ciphertext,
    )
    return [box.decrypt(value) for value in ciphertexts if value]


def raw_connection_table(settings: Settings) -> str:
    with get_engine(settings.resolved_database_url).connect() as connection:
        return str(connection.execute(text("SELECT * FROM connection")).all())


def later(hours: float) -> datetime:
    return datetime.now(UTC) + timedelta(hours=hours)


def test_connect_reviews_scopes_signs_in_on_the_loopback_and_stores_the_connection(
    entra: Settings, sandbox_server: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    browsers: list[threading.Thread] = []
    monkeypatch.setattr(webbrowser, "open", lambda url: browsers.append(play_user(url)))

    result = CliRunner().invoke(cli, ["connect"], input="y\n")

    for browser in browsers:
        browser.join()
    assert result.exit_code == 0, result.output
    review = result.output.split("Open this address")[0]
    for line in (
        r"User\.Read\.All +lookup_user\n",
        r"GroupMember\.Read\.All +lookup_group\n",
        r"GroupMember\.ReadWrite\.All +add_user_to_group, remove_member_from_group\n",
        r"offline_access +keep the connection",
        r"attributed to the account that signs in",
        r"dedicated service account",
    ):
        assert re.search(line, review), line
    assert f"as {SERVICE_ACCOUNT}" in result.output
    assert "Disabled" not in result.output and "least privilege" not in result.output
    assert sandbox_server.app.oauth_stats()["codes_redeemed"] == 1
    stored = load_connection(entra.resolved_database_url)
    assert stored is not None and stored.status is ConnectionStatus.CONNECTED
    for secret in stored_secrets(entra):
        assert secret not in result.output
        assert secret not in raw_connection_table(entra)


def test_the_authorize_url_carries_pkce_and_exactly_the_least_privileged_scopes(
    entra: Settings,
) -> None:
    pending = begin_sign_in(
        entra,
        tenant_id=SANDBOX_TENANT_ID,
        client_id=SANDBOX_CLIENT_ID,
        redirect_uri="http://localhost:1/",
    )

    assert "code_challenge_method=S256" in pending.url
    assert "code_challenge=" in pending.url
    assert pending.scopes == [
        "https://graph.microsoft.com/GroupMember.Read.All",
        "https://graph.microsoft.com/GroupMember.ReadWrite.All",
        "https://graph.microsoft.com/User.Read.All",
        "offline_access",
    ]


def test_a_pasted_redirect_url_connects(entra: Settings) -> None:
    connect_by_paste(entra)

    stored = load_connection(entra.resolved_database_url)
    assert stored is not None
    assert stored.account_upn == SERVICE_ACCOUNT


def test_a_redirect_with_another_state_is_refused_before_redeeming(
    entra: Settings, sandbox_server: SandboxServer
) -> None:
    pending = begin_sign_in(
        entra,
        tenant_id=SANDBOX_TENANT_ID,
        client_id=SANDBOX_CLIENT_ID,
        redirect_uri="http://localhost:1/",
    )
    forged = redirect_of(pending.url).replace(f"state={pending.state}", "state=forged")

    with pytest.raises(AuthenticationError, match="state"):
        finish_sign_in(
            entra, pending, forged, client_secret=None, box=SecretBox.from_settings(entra)
        )

    assert sandbox_server.app.oauth_stats()["codes_redeemed"] == 0
    assert load_connection(entra.resolved_database_url) is None


def test_a_code_redeemed_twice_is_refused_with_entras_trace_id_and_a_reconnect_hint(
    entra: Settings,
) -> None:
    pending = begin_sign_in(
        entra,
        tenant_id=SANDBOX_TENANT_ID,
        client_id=SANDBOX_CLIENT_ID,
        redirect_uri="http://localhost:1/",
    )
    redirect = redirect_of(pending.url)
    box = SecretBox.from_settings(entra)
    finish_sign_in(entra, pending, redirect, client_secret=None, box=box)

    with pytest.raises(AuthenticationError) as raised:
        finish_sign_in(entra, pending, redirect, client_secret=None, box=box)

    assert raised.value.message == (
        "token request refused: invalid_grant (AADSTS54005): run `entraflow connect` again"
    )
    assert raised.value.request_id and TRACE_ID.fullmatch(raised.value.request_id)


def test_missing_and_extra_scopes_are_reported_and_checked(
    entra: Settings, sandbox_server: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox_server.app.set_consented_scopes(["User.Read.All", "Group.Read.All"])
    browsers: list[threading.Thread] = []
    monkeypatch.setattr(webbrowser, "open", lambda url: browsers.append(play_user(url)))

    connected = CliRunner().invoke(cli, ["connect"], input="y\n")
    for browser in browsers:
        browser.join()
    shown = CliRunner().invoke(cli, ["connection", "show", "--json"])
    checked = CliRunner().invoke(cli, ["connection", "check", "--json"])

    assert connected.exit_code == 0, connected.output
    assert "Disabled: add_user_to_group: GroupMember.ReadWrite.All" in connected.output
    assert "least privilege" in connected.output and "Group.Read.All" in connected.output
    details = json.loads(shown.output)
    assert details["actions_available"] == ["lookup_user", "lookup_group"]
    assert set(details["actions_disabled"]) == {"add_user_to_group", "remove_member_from_group"}
    assert details["least_privilege_warning"] == ["Group.Read.All"]
    results = {item["action"]: item["result"] for item in json.loads(checked.output)}
    assert results == {
        "lookup_user": "allowed",
        "lookup_group": "allowed",
        "add_user_to_group": "denied",
        "remove_member_from_group": "denied",
    }
    assert checked.exit_code == 1


def test_show_check_and_disconnect(entra: Settings) -> None:
    connect_by_paste(entra)
    runner = CliRunner()

    shown = json.loads(runner.invoke(cli, ["connection", "show", "--json"]).output)
    checked = runner.invoke(cli, ["connection", "check"])
    disconnected = runner.invoke(cli, ["disconnect"])
    after = json.loads(runner.invoke(cli, ["connection", "show", "--json"]).output)

    assert shown["kind"] == "delegated"
    assert shown["status"] == "connected"
    assert shown["account"] == SERVICE_ACCOUNT
    assert shown["tenant_id"] == SANDBOX_TENANT_ID
    assert shown["access_token_expires_at"] and shown["connected_at"]
    assert len(shown["actions_available"]) == 4
    assert checked.exit_code == 0, checked.output
    assert "lookup_group: allowed" in checked.output
    assert "add_user_to_group: untested" in checked.output
    assert disconnected.exit_code == 0
    assert load_connection(entra.resolved_database_url) is None
    assert after["status"] == "configured"  # the ENTRAFLOW_CLIENT_* app remains


def test_an_app_connection_stores_its_secret_encrypted(
    entra: Settings, sandbox_server: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = CliRunner().invoke(cli, ["connect", "--app"])
    # The stored connection is used even once the settings forget the app.
    monkeypatch.delenv("ENTRAFLOW_CLIENT_SECRET")
    get_settings.cache_clear()

    user = GraphClient.from_settings(get_settings()).request(
        "GET", f"/users/{DEMO_USERS['adele'].id}"
    )

    assert result.exit_code == 0, result.output
    assert "Connected (app)" in result.output
    assert user.data["userPrincipalName"] == DEMO_USERS["adele"].upn
    assert SANDBOX_CLIENT_SECRET not in raw_connection_table(entra)
    assert SANDBOX_CLIENT_SECRET not in result.output


def forget_configured_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENTRAFLOW_CLIENT_SECRET")
    get_settings.cache_clear()


def test_a_client_secret_on_the_command_line_is_refused(
    entra: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    forget_configured_secret(monkeypatch)

    result = CliRunner().invoke(cli, ["connect", "--app", "--client-secret", SANDBOX_CLIENT_SECRET])

    assert result.exit_code != 0
    for way in ("ps", "ENTRAFLOW_CLIENT_SECRET", "--client-secret-file", "prompt"):
        assert way in result.output, way
    assert SANDBOX_CLIENT_SECRET not in result.output
    assert load_connection(entra.resolved_database_url) is None


def test_an_app_connection_reads_its_secret_from_a_private_file(
    entra: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    forget_configured_secret(monkeypatch)
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(SANDBOX_CLIENT_SECRET + "\n")
    secret_file.chmod(0o600)

    result = CliRunner().invoke(cli, ["connect", "--app", "--client-secret-file", str(secret_file)])

    assert result.exit_code == 0, result.output
    assert "Connected (app)" in result.output
    assert SANDBOX_CLIENT_SECRET not in result.output


@pytest.mark.parametrize("mode", [0o640, 0o604])
def test_a_secret_file_others_can_read_is_refused(
    entra: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    forget_configured_secret(monkeypatch)
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(SANDBOX_CLIENT_SECRET)
    secret_file.chmod(mode)

    result = CliRunner().invoke(cli, ["connect", "--app", "--client-secret-file", str(secret_file)])

    assert result.exit_code != 0
    assert f"chmod 600 {secret_file}" in result.output
    assert SANDBOX_CLIENT_SECRET not in result.output
    assert load_connection(entra.resolved_database_url) is None


def test_the_secret_is_prompted_for_without_echo_at_a_terminal(
    entra: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    forget_configured_secret(monkeypatch)
    monkeypatch.setattr(connect_cli, "stdin_is_terminal", lambda: True)

    result = CliRunner().invoke(cli, ["connect", "--app"], input=SANDBOX_CLIENT_SECRET + "\n")

    assert result.exit_code == 0, result.output
    assert "Client secret" in result.output
    assert SANDBOX_CLIENT_SECRET not in result.output


def test_an_app_connection_without_a_secret_says_where_to_put_it(
    entra: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    forget_configured_secret(monkeypatch)
    monkeypatch.setattr(connect_cli, "stdin_is_terminal", lambda: False)

    result = CliRunner().invoke(cli, ["connect", "--app"])

    assert result.exit_code != 0
    assert "ENTRAFLOW_CLIENT_SECRET" in result.output
    assert "--client-secret-file" in result.output
    assert load_connection(entra.resolved_database_url) is None


def test_nothing_is_stored_without_a_secret_key(
    entra: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ENTRAFLOW_SECRET_KEY")
    get_settings.cache_clear()

    app = CliRunner().invoke(cli, ["connect", "--app"])
    delegated = CliRunner().invoke(cli, ["connect", "--paste", "--no-browser"])

    for result in (app, delegated):
        assert result.exit_code != 0
        assert "ENTRAFLOW_SECRET_KEY" in result.output
        assert "--generate-key" in result.output
    assert load_connection(get_settings().resolved_database_url) is None


def test_a_token_is_refreshed_before_it_expires(
    entra: Settings, sandbox_server: SandboxServer, redis_client: redis.Redis
) -> None:
    connect_by_paste(entra)
    stored_before = load_connection(entra.resolved_database_url)
    assert stored_before is not None and stored_before.access_token_refresh_at is not None
    # Just past the refresh time: still before expiry, inside the margin.
    just_after = stored_before.access_token_refresh_at + timedelta(seconds=1)
    tokens = DelegatedTokenProvider(
        entra, SecretBox.from_settings(entra), redis_client, clock=lambda: just_after
    )

    token = tokens.token()

    assert sandbox_server.app.oauth_stats()["refreshes"] == 1
    stored = load_connection(entra.resolved_database_url)
    assert stored is not None
    assert stored.refresh_token_ciphertext != stored_before.refresh_token_ciphertext
    assert token in stored_secrets(entra)


def test_a_401_refreshes_once_and_the_request_goes_through(
    entra: Settings, sandbox_server: SandboxServer, redis_client: redis.Redis
) -> None:
    connect_by_paste(entra)
    sandbox_server.app.expire_tokens()

    response = GraphClient.from_settings(entra).request("GET", "/me")

    assert response.data["userPrincipalName"] == SERVICE_ACCOUNT
    assert sandbox_server.app.oauth_stats()["refreshes"] == 1


def test_many_workers_refreshing_at_once_refresh_once(
    entra: Settings, sandbox_server: SandboxServer, redis_url: str
) -> None:
    connect_by_paste(entra)
    box = SecretBox.from_settings(entra)
    providers = [
        DelegatedTokenProvider(
            entra, box, redis.Redis.from_url(redis_url), clock=lambda: later(hours=1)
        )
        for _ in range(WORKERS)
    ]
    start = threading.Barrier(WORKERS)
    tokens: list[str] = []

    def work(provider: DelegatedTokenProvider) -> None:
        start.wait()
        tokens.append(provider.token())

    threads = [threading.Thread(target=work, args=(p,)) for p in providers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sandbox_server.app.oauth_stats()["refreshes"] == 1
    assert len(tokens) == WORKERS and len(set(tokens)) == 1
    me = requests.get(
        f"{entra.graph_url}/me", headers={"Authorization": f"Bearer {tokens[0]}"}, timeout=5
    )
    assert me.status_code == 200


def test_a_revoked_refresh_token_breaks_the_connection_and_later_calls_fail_fast(
    entra: Settings, sandbox_server: SandboxServer, redis_client: redis.Redis
) -> None:
    connect_by_paste(entra)
    sandbox_server.app.revoke_refresh_tokens(SERVICE_ACCOUNT)
    tokens = DelegatedTokenProvider(
        entra, SecretBox.from_settings(entra), redis_client, clock=lambda: later(hours=2)
    )

    with pytest.raises(
        AuthenticationError, match=r"broken.*AADSTS50173.*entraflow connect"
    ) as raised:
        tokens.token()
    assert raised.value.request_id and TRACE_ID.fullmatch(raised.value.request_id)
    token_requests = sandbox_server.app.stats()["requests"]["POST"]["token"]
    with pytest.raises(AuthenticationError, match="broken"):
        tokens.token()
    with pytest.raises(AuthenticationError, match="broken"):
        GraphClient.from_settings(entra).request("GET", "/me")

    assert sandbox_server.app.stats()["requests"]["POST"]["token"] == token_requests
    stored = load_connection(entra.resolved_database_url)
    assert stored is not None and stored.status is ConnectionStatus.BROKEN
    assert stored.access_token_ciphertext is None
    shown = json.loads(CliRunner().invoke(cli, ["connection", "show", "--json"]).output)
    assert shown["status"] == "broken" and "AADSTS50173" in shown["broken_reason"]


@pytest.mark.parametrize(
    ("reply", "error_class", "expected", "trace_id"),
    [
        (
            Reply(
                401,
                {
                    "error": "invalid_client",
                    "error_description": "AADSTS7000222: The provided client secret keys are "
                    "expired. Trace ID: 0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b Correlation ID: x",
                },
            ),
            AuthenticationError,
            "token request refused: invalid_client (AADSTS7000222): "
            "ENTRAFLOW_CLIENT_SECRET has expired: create a new one",
            "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b",
        ),
        (
            Reply(400, {"error": "temporarily_unavailable"}),
            ServiceUnavailableError,
            "token endpoint unavailable: temporarily_unavailable",
            None,
        ),
        (Reply(503, body=b"<html/>"), ServiceUnavailableError, "token endpoint unavailable", None),
    ],
)
def test_a_refused_refresh_is_translated_like_a_client_credentials_one(
    entra: Settings,
    redis_client: redis.Redis,
    reply: Reply,
    error_class: type[GraphError],
    expected: str,
    trace_id: str | None,
) -> None:
    connect_by_paste(entra)
    transport = FakeTransport([reply])

    def session_factory(client: WebApplicationClient) -> OAuth2Session:
        session = OAuth2Session(client=client)
        transport.mount_on(session)
        return session

    tokens = DelegatedTokenProvider(
        entra,
        SecretBox.from_settings(entra),
        redis_client,
        session_factory=session_factory,
        clock=lambda: later(hours=2),
    )

    with pytest.raises(error_class) as raised:
        tokens.token()

    assert (raised.value.message, raised.value.request_id) == (expected, trace_id)
    assert transport.requests[0].form()["grant_type"] == "refresh_token"
    stored = load_connection(entra.resolved_database_url)
    assert stored is not None and stored.status is ConnectionStatus.CONNECTED


def test_no_token_or_secret_reaches_the_logs(
    entra: Settings,
    sandbox_server: SandboxServer,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    connect_by_paste(entra)
    first = stored_secrets(entra)
    DelegatedTokenProvider(
        entra, SecretBox.from_settings(entra), redis_client, clock=lambda: later(hours=1)
    ).token()

    logged = caplog.text
    for secret in [*first, *stored_secrets(entra), SANDBOX_CLIENT_SECRET]:
        assert secret not in logged
