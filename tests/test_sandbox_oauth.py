"""The sandbox's authorize endpoint and its authorization-code and refresh-token grants."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests

from sandbox.directory import (
    DEMO_GROUP_ID,
    DEMO_USER_ID,
    DEMO_USERS,
    SANDBOX_CLIENT_ID,
    SANDBOX_TENANT_ID,
)
from sandbox.server import SandboxServer

ADELE = DEMO_USERS["adele"]
REDIRECT_URI = "http://localhost:8765/"
ASKED = (
    "https://graph.microsoft.com/User.Read.All https://graph.microsoft.com/GroupMember.Read.All "
    "https://graph.microsoft.com/GroupMember.ReadWrite.All offline_access"
)


@pytest.fixture
def server() -> Iterator[SandboxServer]:
    with SandboxServer() as running:
        yield running


def challenge_of(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorize(server: SandboxServer, **overrides: str) -> requests.Response:
    """The sandbox's answer to a browser sent to the authorize URL."""
    params = {
        "client_id": SANDBOX_CLIENT_ID,
        "response_type": "code",
        "redirect_uri": REDIRECT_URI,
        "scope": ASKED,
        "state": "state-1",
        "code_challenge": challenge_of("v" * 43),
        "code_challenge_method": "S256",
        "login_hint": ADELE.upn,
        **overrides,
    }
    url = f"{server.url}/{SANDBOX_TENANT_ID}/oauth2/v2.0/authorize?{urlencode(params)}"
    return requests.get(url, allow_redirects=False, timeout=5)


def redirect_params(response: requests.Response) -> dict[str, str]:
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location.startswith(REDIRECT_URI)
    return {name: values[0] for name, values in parse_qs(urlsplit(location).query).items()}


def redeem(server: SandboxServer, code: str, **overrides: str) -> requests.Response:
    form = {
        "grant_type": "authorization_code",
        "client_id": SANDBOX_CLIENT_ID,
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": "v" * 43,
        **overrides,
    }
    return requests.post(
        f"{server.url}/{SANDBOX_TENANT_ID}/oauth2/v2.0/token", data=form, timeout=5
    )


def refresh(server: SandboxServer, refresh_token: str) -> requests.Response:
    form = {
        "grant_type": "refresh_token",
        "client_id": SANDBOX_CLIENT_ID,
        "refresh_token": refresh_token,
    }
    return requests.post(
        f"{server.url}/{SANDBOX_TENANT_ID}/oauth2/v2.0/token", data=form, timeout=5
    )


def signed_in(server: SandboxServer) -> dict[str, Any]:
    answer: dict[str, Any] = redeem(server, redirect_params(authorize(server))["code"]).json()
    return answer


def test_authorize_redirects_with_a_code_and_the_state(server: SandboxServer) -> None:
    params = redirect_params(authorize(server))

    assert params["state"] == "state-1"
    assert len(params["code"]) > 20


def test_the_code_redeems_for_tokens_with_entras_scope_list(server: SandboxServer) -> None:
    answer = signed_in(server)

    assert answer["token_type"] == "Bearer"
    assert answer["refresh_token"]
    assert answer["scope"].split() == [
        "https://graph.microsoft.com/GroupMember.Read.All",
        "https://graph.microsoft.com/GroupMember.ReadWrite.All",
        "https://graph.microsoft.com/User.Read.All",
        "openid",
        "profile",
        "offline_access",
    ]


def test_a_delegated_token_acts_as_the_signed_in_user(server: SandboxServer) -> None:
    token = signed_in(server)["access_token"]

    me = requests.get(
        f"{server.graph_url}/me?$select=userPrincipalName",
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    )

    assert me.json()["userPrincipalName"] == ADELE.upn


def test_an_app_token_cannot_ask_for_me(server: SandboxServer) -> None:
    token = server.app.issue_token()

    me = requests.get(
        f"{server.graph_url}/me", headers={"Authorization": f"Bearer {token}"}, timeout=5
    )

    assert me.status_code == 400


def test_a_wrong_code_verifier_is_refused(server: SandboxServer) -> None:
    code = redirect_params(authorize(server))["code"]

    answer = redeem(server, code, code_verifier="w" * 43)

    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_grant"
    assert answer.json()["error_codes"] == [501481]


def test_a_code_redeems_only_once(server: SandboxServer) -> None:
    code = redirect_params(authorize(server))["code"]
    assert redeem(server, code).status_code == 200

    again = redeem(server, code)

    assert again.status_code == 400
    assert again.json()["error_codes"] == [54005]


def test_a_different_redirect_uri_at_redemption_is_refused(server: SandboxServer) -> None:
    code = redirect_params(authorize(server))["code"]

    answer = redeem(server, code, redirect_uri="http://localhost:9999/")

    assert answer.json()["error_codes"] == [500112]


def test_an_unknown_client_gets_an_error_page_not_a_redirect(server: SandboxServer) -> None:
    response = authorize(server, client_id="00000000-0000-0000-0000-000000000001")

    assert response.status_code == 400
    assert "Location" not in response.headers
    assert "AADSTS700016" in response.text


def test_a_redirect_uri_off_this_machine_gets_an_error_page(server: SandboxServer) -> None:
    response = authorize(server, redirect_uri="https://attacker.example/cb")

    assert response.status_code == 400
    assert "AADSTS50011" in response.text


def test_an_unknown_scope_is_redirected_as_invalid_scope(server: SandboxServer) -> None:
    params = redirect_params(authorize(server, scope="Mail.Send.Everything offline_access"))

    assert params["error"] == "invalid_scope"
    assert params["state"] == "state-1"
    assert "code" not in params


def test_a_refresh_rotates_the_refresh_token(server: SandboxServer) -> None:
    first = signed_in(server)

    second = refresh(server, first["refresh_token"]).json()

    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    reused = refresh(server, first["refresh_token"])
    assert reused.status_code == 400
    assert reused.json()["error"] == "invalid_grant"
    assert server.app.oauth_stats()["refreshes"] == 1


def test_a_revoked_refresh_token_is_invalid_grant(server: SandboxServer) -> None:
    answer = signed_in(server)

    assert server.app.revoke_refresh_tokens(ADELE.upn) == 1

    refused = refresh(server, answer["refresh_token"]).json()
    assert (refused["error"], refused["error_codes"]) == ("invalid_grant", [50173])


def test_an_expired_refresh_token_is_invalid_grant(server: SandboxServer) -> None:
    answer = signed_in(server)
    server.app.expire_refresh_tokens()

    refused = refresh(server, answer["refresh_token"]).json()

    assert refused["error_codes"] == [700082]


def test_consented_scopes_replace_the_asked_ones(server: SandboxServer) -> None:
    server.app.set_consented_scopes(["User.Read.All", "Group.Read.All"])

    scopes = signed_in(server)["scope"].split()

    assert "https://graph.microsoft.com/Group.Read.All" in scopes
    assert "https://graph.microsoft.com/GroupMember.ReadWrite.All" not in scopes


def test_a_delegated_token_without_the_permission_is_forbidden(server: SandboxServer) -> None:
    server.app.set_consented_scopes(["User.Read.All"])
    token = signed_in(server)["access_token"]

    response = requests.post(
        f"{server.graph_url}/groups/{DEMO_GROUP_ID}/members/$ref",
        json={"@odata.id": f"https://graph.microsoft.com/v1.0/directoryObjects/{DEMO_USER_ID}"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    )

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "Authorization_RequestDenied"
    assert DEMO_USER_ID not in server.app.directory.members(DEMO_GROUP_ID)


def test_the_oauth_controls_answer_over_http(server: SandboxServer) -> None:
    signed_in(server)
    control = f"{server.url}/_sandbox/oauth"

    consent = requests.post(f"{control}/consent", json={"scopes": ["User.Read.All"]}, timeout=5)
    revoked = requests.post(f"{control}/revoke", json={"upn": ADELE.upn}, timeout=5)
    stats = requests.get(control, timeout=5).json()

    assert consent.json()["consented_scopes"] == ["User.Read.All"]
    assert revoked.json() == {"revoked": 1}
    assert stats["codes_redeemed"] == 1
    assert stats["refresh_tokens_active"] == 0


def test_a_verifier_is_required_when_a_challenge_was_sent(server: SandboxServer) -> None:
    code = redirect_params(authorize(server, code_challenge=challenge_of(secrets.token_urlsafe())))

    answer = redeem(server, code["code"], code_verifier="")

    assert answer.status_code == 400
