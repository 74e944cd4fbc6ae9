"""Client-credentials tokens: the request, caching, refresh, and refusals without secrets."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from fake_transport import FakeTransport, Reply
from oauthlib.oauth2 import BackendApplicationClient
from pydantic import SecretStr
from requests_oauthlib import OAuth2Session

from entraflow.settings import Settings
from worker.errors import (
    AuthenticationError,
    GraphConnectionError,
    ServiceUnavailableError,
    ThrottledError,
    TransientGraphError,
)
from worker.permissions import scope_for_graph
from worker.tokens import ClientCredentialsTokenProvider

AUTHORITY = "https://login.microsoftonline.com"
TENANT = "contoso.onmicrosoft.com"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
SECRET = "s3cr3t~Value.Never_Shown"
TOKEN_URL = f"{AUTHORITY}/{TENANT}/oauth2/v2.0/token"
TRACE_ID = "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"


def token_reply(access_token: str = "eyJ.token.1", expires_in: int = 3599, **extra: str) -> Reply:
    return Reply(
        200,
        {"token_type": "Bearer", "expires_in": expires_in, "access_token": access_token, **extra},
    )


def refusal(status: int, error: str, aadsts: str, text: str) -> Reply:
    description = f"AADSTS{aadsts}: {text} Trace ID: {TRACE_ID} Correlation ID: x Timestamp: y"
    return Reply(
        status,
        {"error": error, "error_description": description, "error_codes": [int(aadsts)]},
    )


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def provider(
    transport: FakeTransport,
    *,
    authority: str = AUTHORITY,
    clock: Clock | None = None,
    refresh_margin_s: float = 300.0,
) -> ClientCredentialsTokenProvider:
    def session_factory(client: BackendApplicationClient) -> OAuth2Session:
        session = OAuth2Session(client=client)
        transport.mount_on(session)
        return session

    return ClientCredentialsTokenProvider(
        authority,
        TENANT,
        CLIENT_ID,
        SecretStr(SECRET),
        session_factory=session_factory,
        refresh_margin_s=refresh_margin_s,
        timeout_s=7.0,
        clock=clock or Clock(),
    )


def test_token_request_is_a_client_credentials_form_post() -> None:
    transport = FakeTransport([token_reply()])

    assert provider(transport).token() == "eyJ.token.1"

    (sent,) = transport.requests
    assert (sent.method, sent.url, sent.timeout) == ("POST", TOKEN_URL, 7.0)
    assert sent.form() == {
        "grant_type": "client_credentials",
        "client_id": CLIENT_ID,
        "client_secret": SECRET,
        "scope": "https://graph.microsoft.com/.default",
    }
    assert "Authorization" not in sent.headers


def test_token_is_cached_until_the_refresh_margin() -> None:
    clock = Clock()
    transport = FakeTransport([token_reply("first", 3600), token_reply("second", 3600)])
    tokens = provider(transport, clock=clock, refresh_margin_s=300.0)

    assert tokens.token() == "first"
    clock.now_s += 3299.0
    assert tokens.token() == "first"
    clock.now_s += 1.0
    assert tokens.token() == "second"
    assert len(transport.requests) == 2


def test_a_short_lived_token_is_used_for_half_its_life_whatever_the_margin() -> None:
    clock = Clock()
    transport = FakeTransport([token_reply("first", 60), token_reply("second", 60)])
    tokens = provider(transport, clock=clock, refresh_margin_s=300.0)

    tokens.token()
    clock.now_s += 29.0
    assert tokens.token() == "first"
    clock.now_s += 1.0
    assert tokens.token() == "second"


def test_a_rejected_token_is_fetched_anew_once_however_many_callers_saw_it_rejected() -> None:
    transport = FakeTransport([token_reply("first"), token_reply("second")])
    tokens = provider(transport)

    assert tokens.token() == "first"
    assert tokens.token(rejected="first") == "second"
    # Other threads that sent "first" at the same moment take the new one, no fetch of their own.
    assert tokens.token(rejected="first") == "second"
    assert tokens.token() == "second"
    assert len(transport.requests) == 2


def test_entra_answering_another_scope_list_is_accepted_without_touching_the_environment() -> None:
    granted = "https://graph.microsoft.com/User.Read.All https://graph.microsoft.com/GroupMember.ReadWrite.All"
    transport = FakeTransport([token_reply(scope=granted)])

    assert provider(transport).token() == "eyJ.token.1"
    assert "OAUTHLIB_RELAX_TOKEN_SCOPE" not in os.environ


@pytest.mark.parametrize(
    ("graph_url", "scope"),
    [
        ("https://graph.microsoft.com/v1.0", "https://graph.microsoft.com/.default"),
        ("https://graph.microsoft.us/v1.0", "https://graph.microsoft.us/.default"),
        ("https://microsoftgraph.chinacloudapi.cn/v1.0", "https://microsoftgraph.chinacloudapi.cn/.default"),
        ("http://127.0.0.1:8080/v1.0", "https://graph.microsoft.com/.default"),
    ],
)  # fmt: skip
def test_scope_follows_the_graph_host(graph_url: str, scope: str) -> None:
    assert scope_for_graph(graph_url) == scope


@pytest.mark.parametrize(
    ("reply", "code", "expected"),
    [
        (
            refusal(401, "invalid_client", "7000215", "Invalid client secret provided."),
            "invalid_client",
            "token request refused: invalid_client (AADSTS7000215): check ENTRAFLOW_CLIENT_SECRET",
        ),
        (
            refusal(400, "unauthorized_client", "700016", "Application not found."),
            "unauthorized_client",
            "token request refused: unauthorized_client (AADSTS700016): "
            "check ENTRAFLOW_CLIENT_ID and ENTRAFLOW_TENANT_ID",
        ),
        (
            refusal(400, "invalid_request", "90002", "Tenant not found."),
            "invalid_request",
            "token request refused: invalid_request (AADSTS90002): check ENTRAFLOW_TENANT_ID",
        ),
        (
            Reply(400, {"error": "invalid_scope"}),
            "invalid_scope",
            "token request refused: invalid_scope: check ENTRAFLOW_GRAPH_URL",
        ),
    ],
)
def test_refusals_name_the_code_and_the_setting_to_check(
    reply: Reply, code: str, expected: str
) -> None:
    with pytest.raises(AuthenticationError) as raised:
        provider(FakeTransport([reply])).token()

    assert raised.value.message == expected
    assert raised.value.code == code
    assert raised.value.__cause__ is not None


def test_refusals_never_show_the_secret_nor_the_description() -> None:
    echoing = refusal(401, "invalid_client", "7000215", f"Secret {SECRET} is wrong.")

    with pytest.raises(AuthenticationError) as raised:
        provider(FakeTransport([echoing])).token()

    for text in (str(raised.value), repr(raised.value), str(raised.value.to_dict())):
        assert SECRET not in text
        assert "is wrong" not in text
    assert raised.value.request_id == TRACE_ID


def test_the_token_request_is_not_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    provider(FakeTransport([token_reply("eyJ.secret.token")])).token()

    assert SECRET not in caplog.text
    assert "eyJ.secret.token" not in caplog.text


def test_a_token_endpoint_server_error_is_transient() -> None:
    with pytest.raises(ServiceUnavailableError) as raised:
        provider(FakeTransport([Reply(400, {"error": "temporarily_unavailable"})])).token()

    assert raised.value.code == "temporarily_unavailable"


@pytest.mark.parametrize(
    ("reply", "error_class"),
    [
        (Reply(503, body=b"<html/>", headers={"Retry-After": "4"}), ServiceUnavailableError),
        (Reply(429, body=b"", headers={"Retry-After": "4"}), ThrottledError),
    ],
)  # fmt: skip
def test_a_failing_token_endpoint_is_transient(
    reply: Reply, error_class: type[TransientGraphError]
) -> None:
    with pytest.raises(error_class) as raised:
        provider(FakeTransport([reply])).token()

    assert raised.value.retry_after_s == 4.0


@pytest.mark.parametrize(
    "failure", [requests.ConnectionError("refused"), requests.ConnectTimeout("slow")]
)
def test_an_unreachable_token_endpoint_is_a_connection_error(failure: Exception) -> None:
    with pytest.raises(GraphConnectionError, match="token endpoint") as raised:
        provider(FakeTransport([failure])).token()

    assert raised.value.__cause__ is failure


def test_a_plain_http_authority_works_once_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")
    transport = FakeTransport([token_reply()])

    assert provider(transport, authority="http://127.0.0.1:8080").token() == "eyJ.token.1"
    assert transport.requests[0].url == f"http://127.0.0.1:8080/{TENANT}/oauth2/v2.0/token"


@pytest.mark.parametrize(
    ("missing", "variable"),
    [
        ({"tenant_id": None}, "ENTRAFLOW_TENANT_ID"),
        ({"client_id": ""}, "ENTRAFLOW_CLIENT_ID"),
        ({"client_secret": None}, "ENTRAFLOW_CLIENT_SECRET"),
        ({"client_secret": SecretStr("")}, "ENTRAFLOW_CLIENT_SECRET"),
    ],
)
def test_missing_connection_settings_are_named(missing: dict[str, object], variable: str) -> None:
    values: dict[str, Any] = {
        "tenant_id": TENANT,
        "client_id": CLIENT_ID,
        "client_secret": SecretStr(SECRET),
        **missing,
    }
    settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]

    with pytest.raises(AuthenticationError) as raised:
        ClientCredentialsTokenProvider.from_settings(settings)

    assert str(raised.value).startswith(f"authentication failed: {variable} not set")


def test_from_settings_uses_the_connection_and_the_graph_scope() -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        graph_url="https://graph.microsoft.us/v1.0",
        authority_url="https://login.microsoftonline.us",
        tenant_id=TENANT,
        client_id=CLIENT_ID,
        client_secret=SecretStr(SECRET),
    )

    tokens = ClientCredentialsTokenProvider.from_settings(settings)

    assert tokens.token_url == f"https://login.microsoftonline.us/{TENANT}/oauth2/v2.0/token"
    assert tokens.scope == "https://graph.microsoft.us/.default"
    assert SECRET not in repr(vars(tokens))


def test_threads_share_one_token_fetch() -> None:
    transport = FakeTransport([token_reply("shared")])
    tokens = provider(transport)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: tokens.token(), range(32)))

    assert set(results) == {"shared"}
    assert len(transport.requests) == 1
