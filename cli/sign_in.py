"""Connecting to Entra: a delegated sign-in (authorization code with PKCE), or client credentials.

Both check what they were given with one token request, then store the connection with its
secrets encrypted; the worker's token providers (worker.tokens) use it from then on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import requests
from pydantic import SecretStr
from requests_oauthlib import OAuth2Session

from entraflow.secrets import SecretBox
from entraflow.settings import Settings, check_transport
from models.connections import Connection, ConnectionKind, save_connection
from models.db import utcnow
from worker.errors import AuthenticationError
from worker.permissions import delegated_scopes, scope_for_graph
from worker.tokens import (
    AADSTS_PATTERN,
    TOKEN_ENDPOINT,
    Authority,
    ClientCredentialsTokenProvider,
    SessionFactory,
    hide_token_logs,
    new_oauth2_session,
    refuse_unavailable,
    token_expiry,
)

PKCE_METHOD = "S256"
AUTHORIZE_ENDPOINT = "authorize"
# Who signed in: the cheapest read that names them (GET /me needs no more than User.Read.All).
ME_PATH = "/me"
ME_QUERY = "$select=userPrincipalName"


@dataclass
class PendingSignIn:
    """An authorization request sent to the browser, waiting for its redirect."""

    url: str
    state: str
    redirect_uri: str
    scopes: list[str]
    tenant_id: str
    client_id: str
    # Holds the PKCE code verifier: the same session must redeem the code.
    session: OAuth2Session
    # Checked when the sign-in began: the code and the client secret go there.
    authority: Authority


def begin_sign_in(
    settings: Settings,
    *,
    tenant_id: str,
    client_id: str,
    redirect_uri: str,
    login_hint: str | None = None,
) -> PendingSignIn:
    """The authorize URL (PKCE S256) asking for exactly the scopes the actions need."""
    hide_token_logs()
    scopes = delegated_scopes(settings.graph_url)
    session = OAuth2Session(client_id, redirect_uri=redirect_uri, scope=scopes, pkce=PKCE_METHOD)
    extra = {"login_hint": login_hint} if login_hint else {}
    authority = Authority(settings.authority_url)
    url, state = authority.call(
        tenant_id,
        AUTHORIZE_ENDPOINT,
        lambda authorize_url: session.authorization_url(authorize_url, **extra),
    )
    # Entra answers with other scopes than asked; with none to compare, oauthlib keeps its
    # answer instead of raising "Scope has changed" (no process-wide OAUTHLIB_RELAX_TOKEN_SCOPE).
    session.scope = None
    return PendingSignIn(url, state, redirect_uri, scopes, tenant_id, client_id, session, authority)


def finish_sign_in(
    settings: Settings,
    pending: PendingSignIn,
    redirect_url: str,
    *,
    client_secret: SecretStr | None,
    box: SecretBox,
    graph_session: requests.Session | None = None,
) -> Connection:
    """Redeem the code the redirect carries and store the delegated connection."""
    params = dict(parse_qsl(urlsplit(redirect_url).query, keep_blank_values=True))
    # Checked before anything else: a redirect we did not ask for is somebody else's sign-in.
    if params.get("state") != pending.state:
        raise AuthenticationError(
            "the redirect's state does not match this sign-in's: refused (a stale or forged "
            "redirect); start `entraflow connect` again"
        )
    if "error" in params:
        aadsts = AADSTS_PATTERN.search(params.get("error_description", ""))
        number = f" (AADSTS{aadsts.group(1)})" if aadsts else ""
        raise AuthenticationError(
            f"sign-in refused: {params['error']}{number}", code=params["error"]
        )
    code = params.get("code")
    if not code:
        raise AuthenticationError("the redirect carries no authorization code")
    pending.session.register_compliance_hook("access_token_response", refuse_unavailable)
    answer = pending.authority.call(
        pending.tenant_id,
        TOKEN_ENDPOINT,
        lambda token_url: pending.session.fetch_token(
            token_url,
            code=code,
            include_client_id=True,
            client_secret=client_secret.get_secret_value() if client_secret else None,
            timeout=settings.http_timeout_s,
        ),
    )
    if not answer.get("refresh_token"):
        raise AuthenticationError(
            "Entra issued no refresh token: the sign-in must grant offline_access"
        )
    now = utcnow()
    expires_at, refresh_at = token_expiry(answer, now, settings.token_refresh_margin_s)
    access_token = str(answer["access_token"])
    connection = Connection(
        kind=ConnectionKind.DELEGATED,
        tenant_id=pending.tenant_id,
        client_id=pending.client_id,
        account_upn=_signed_in_account(settings, access_token, graph_session),
        scopes=_granted_scopes(answer, pending.scopes),
        refresh_token_ciphertext=box.encrypt(str(answer["refresh_token"])),
        client_secret_ciphertext=box.encrypt(client_secret.get_secret_value())
        if client_secret
        else None,
        access_token_ciphertext=box.encrypt(access_token),
        access_token_expires_at=expires_at,
        access_token_refresh_at=refresh_at,
        connected_at=now,
    )
    return save_connection(settings.resolved_database_url, connection)


def connect_app(
    settings: Settings,
    *,
    tenant_id: str,
    client_id: str,
    client_secret: SecretStr,
    box: SecretBox,
    session_factory: SessionFactory = new_oauth2_session,
) -> Connection:
    """Check the client credentials with one token request, then store them encrypted."""
    ClientCredentialsTokenProvider(
        settings.authority_url,
        tenant_id,
        client_id,
        client_secret,
        scope=scope_for_graph(settings.graph_url),
        session_factory=session_factory,
        timeout_s=settings.http_timeout_s,
    ).token()
    connection = Connection(
        kind=ConnectionKind.APP,
        tenant_id=tenant_id,
        client_id=client_id,
        client_secret_ciphertext=box.encrypt(client_secret.get_secret_value()),
        connected_at=utcnow(),
    )
    return save_connection(settings.resolved_database_url, connection)


def _granted_scopes(answer: Mapping[str, Any], asked: list[str]) -> str:
    # RFC 6749 5.1: an answer without `scope` granted exactly what was asked.
    scope = answer.get("scope")
    if isinstance(scope, list):
        return " ".join(str(item) for item in scope)
    return str(scope) if scope else " ".join(asked)


def _signed_in_account(
    settings: Settings, access_token: str, session: requests.Session | None
) -> str | None:
    """The UPN of the account that signed in, or None when Graph will not say."""
    try:
        # A refused URL (ValueError) gets no token: the settings should have refused it already.
        me_url = check_transport(f"{settings.graph_url.rstrip('/')}{ME_PATH}", "the Graph URL")
        response = (session or requests.Session()).get(
            f"{me_url}?{ME_QUERY}",
            headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
            timeout=settings.http_timeout_s,
            allow_redirects=False,
        )
        upn = response.json().get("userPrincipalName") if response.ok else None
    except (requests.RequestException, ValueError, AttributeError):
        # Only a label for `connection show`: the connection works without it.
        return None
    return upn if isinstance(upn, str) else None
