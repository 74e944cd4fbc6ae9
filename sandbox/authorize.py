"""The identity platform's authorize endpoint, with the user's part played by the sandbox.

Entra shows a sign-in and consent page; the sandbox signs in the account named by `login_hint`
(the seeded service account without one), consents at once and redirects back with a code.
Errors are answered as Entra answers them: a bad client or redirect URI gets an error page (a
redirect would hand the error to an unverified address), anything else a redirect with `error`.
"""

from __future__ import annotations

import html
import uuid
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sandbox.config import SandboxConfig
from sandbox.directory import DEMO_USERS, SANDBOX_DOMAIN, Directory
from sandbox.responses import SandboxResponse
from sandbox.tokens import PKCE_METHOD, OAuthError, TokenIssuer, normalize_scope

# Who signs in when the request names nobody: the seeded service account.
DEFAULT_ACCOUNT_UPN = DEMO_USERS["svc"].upn
# Entra lets native apps redirect to the loopback interface on any port.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
HTML_CONTENT_TYPE = "text/html; charset=utf-8"


class _RedirectError(Exception):
    """Raised when the request is refused with a redirect carrying `error`."""

    def __init__(self, error: str, aadsts: int, description: str) -> None:
        super().__init__(f"{error}: AADSTS{aadsts}: {description}")
        self.error = error
        self.description = f"AADSTS{aadsts}: {description}"


def authorize(
    issuer: TokenIssuer, config: SandboxConfig, directory: Directory, tenant: str, query: str
) -> SandboxResponse:
    """Answer `GET /{tenant}/oauth2/v2.0/authorize?...`; the caller holds the lock."""
    params = dict(parse_qsl(query, keep_blank_values=True))
    try:
        if tenant.lower() not in {config.tenant_id.lower(), SANDBOX_DOMAIN}:
            raise OAuthError(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
        client_id = params.get("client_id", "")
        issuer.check_client(tenant, client_id)
        redirect_uri = params.get("redirect_uri", "")
        if not _is_loopback(redirect_uri):
            raise OAuthError(
                400,
                "invalid_request",
                50011,
                f"The redirect URI '{redirect_uri}' specified in the request does not match the "
                f"redirect URIs configured for the application '{client_id}'.",
            )
    except OAuthError as exc:
        return _error_page(exc)
    state = params.get("state")
    try:
        code = _sign_in(issuer, directory, params, client_id, redirect_uri)
    except _RedirectError as exc:
        return _redirect(
            redirect_uri, {"error": exc.error, "error_description": exc.description}, state
        )
    except OAuthError as exc:
        return _error_page(exc)
    return _redirect(redirect_uri, {"code": code, "session_state": str(uuid.uuid4())}, state)


def _sign_in(
    issuer: TokenIssuer,
    directory: Directory,
    params: Mapping[str, str],
    client_id: str,
    redirect_uri: str,
) -> str:
    if params.get("response_type") != "code":
        raise _RedirectError(
            "unsupported_response_type",
            700054,
            "response_type must be 'code' for the authorization code flow.",
        )
    asked = params.get("scope", "").split()
    if not asked:
        raise _RedirectError(
            "invalid_request", 900144, "The request must contain the parameter: 'scope'."
        )
    scopes = []
    for scope in asked:
        name = normalize_scope(scope)
        if name is None:
            raise _RedirectError(
                "invalid_scope",
                70011,
                f"The provided value for the input parameter 'scope' is not valid. "
                f"The scope '{scope}' does not exist.",
            )
        scopes.append(name)
    challenge = params.get("code_challenge") or None
    if challenge is not None and params.get("code_challenge_method") != PKCE_METHOD:
        raise _RedirectError(
            "invalid_request",
            50148,
            f"The code_challenge_method must be {PKCE_METHOD}: the sandbox accepts no other.",
        )
    upn = params.get("login_hint") or DEFAULT_ACCOUNT_UPN
    user = directory.user(upn)
    if user is None:
        raise OAuthError(
            400,
            "invalid_request",
            50034,
            f"The user account {upn} does not exist in the directory. To sign into this "
            "application, the account must be added to the directory.",
        )
    granted = issuer.grant(scopes)
    return issuer.issue_code(client_id, redirect_uri, user["userPrincipalName"], granted, challenge)


def _is_loopback(redirect_uri: str) -> bool:
    try:
        parts = urlsplit(redirect_uri)
        parts.port  # noqa: B018  (raises ValueError for a malformed port)
    except ValueError:
        return False
    return parts.scheme == "http" and (parts.hostname or "") in LOOPBACK_HOSTS


def _redirect(redirect_uri: str, values: dict[str, str], state: str | None) -> SandboxResponse:
    if state is not None:
        values = {**values, "state": state}
    parts = urlsplit(redirect_uri)
    query = "&".join(part for part in (parts.query, urlencode(values)) if part)
    location = urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, ""))
    return SandboxResponse(302, {"Location": location, "Cache-Control": "no-store, no-cache"})


def _error_page(exc: OAuthError) -> SandboxResponse:
    text = (
        f"Sorry, but we're having trouble signing you in.\n\nAADSTS{exc.aadsts}: {exc.description}"
    )
    body = f"<!DOCTYPE html><html><body><pre>{html.escape(text)}</pre></body></html>"
    return SandboxResponse(exc.status, {"Content-Type": HTML_CONTENT_TYPE}, body.encode())
