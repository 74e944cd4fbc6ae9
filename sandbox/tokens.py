"""The identity platform's token endpoint and the access tokens it issues.

Each grant type is one method in `TokenIssuer._grants`: client credentials (app-only tokens),
authorization code with PKCE and refresh token (delegated tokens, acting as the signed-in user).
Refresh tokens rotate as Entra's do: each refresh answers a new one and this sandbox retires the
old one, so a client that keeps using a stale refresh token is caught here.
"""

from __future__ import annotations

import base64
import hashlib
import math
import secrets
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from sandbox.config import SandboxConfig
from sandbox.directory import SANDBOX_DOMAIN
from sandbox.responses import SandboxResponse
from sandbox.stats import RouteKind

# Bytes of randomness in an access token, refresh token or code (all opaque, not JWTs).
TOKEN_BYTES = 32
# Client credentials must ask for a resource's `/.default` scope.
DEFAULT_SCOPE_SUFFIX = "/.default"
GRAPH_RESOURCE = "https://graph.microsoft.com/"
# Entra's lifetimes: an authorization code about 10 minutes, a refresh token 90 days.
CODE_LIFETIME_S = 600.0
REFRESH_TOKEN_LIFETIME_S = 90 * 24 * 3600.0
OFFLINE_ACCESS = "offline_access"
# Sign-in scopes Entra lists in every delegated answer besides the Graph permissions.
SIGN_IN_SCOPES = ("openid", "profile")
PKCE_METHOD = "S256"
# The delegated Graph permissions this sandbox knows; any other asked scope is invalid_scope.
GRAPH_PERMISSIONS = (
    "User.Read",
    "User.ReadBasic.All",
    "User.Read.All",
    "User.ReadWrite.All",
    "GroupMember.Read.All",
    "GroupMember.ReadWrite.All",
    "Group.Read.All",
    "Group.ReadWrite.All",
    "Directory.Read.All",
    "Directory.ReadWrite.All",
)
_CANONICAL = {name.lower(): name for name in (*GRAPH_PERMISSIONS, OFFLINE_ACCESS, *SIGN_IN_SCOPES)}
_USER_READERS = frozenset(
    {"User.Read.All", "User.ReadWrite.All", "Directory.Read.All", "Directory.ReadWrite.All"}
)
_GROUP_WRITERS = frozenset(
    {"GroupMember.ReadWrite.All", "Group.ReadWrite.All", "Directory.ReadWrite.All"}
)
_GROUP_READERS = _GROUP_WRITERS | {"GroupMember.Read.All", "Group.Read.All", "Directory.Read.All"}
# A delegated token needs one of these permissions for the route (Graph's permission tables).
PERMISSIONS_BY_ROUTE: dict[RouteKind, frozenset[str]] = {
    RouteKind.USER: _USER_READERS | {"User.Read", "User.ReadBasic.All"},
    RouteKind.USERS: _USER_READERS | {"User.ReadBasic.All"},
    RouteKind.GROUP: _GROUP_READERS,
    RouteKind.MEMBERS: _GROUP_READERS,
    RouteKind.GROUP_UPDATE: _GROUP_WRITERS,
    RouteKind.MEMBER_ADD: _GROUP_WRITERS,
    RouteKind.MEMBER_REMOVE: _GROUP_WRITERS,
    RouteKind.MEMBER_OBJECT_DELETE: frozenset({"User.ReadWrite.All", "Directory.ReadWrite.All"}),
}


@dataclass
class IssuedToken:
    """An access token: the app and tenant it was issued to and when it stops working.

    A delegated token also names the signed-in account and the permissions it was granted.
    """

    client_id: str
    tenant_id: str
    expires_at: float
    scopes: frozenset[str] | None = None  # None: an app-only token
    account_upn: str | None = None


@dataclass
class AuthorizationCode:
    """A code the authorize endpoint handed out, redeemable once."""

    client_id: str
    redirect_uri: str
    account_upn: str
    scopes: tuple[str, ...]  # as granted, canonical names
    code_challenge: str | None
    expires_at: float
    redeemed: bool = False


class RefreshState(StrEnum):
    ACTIVE = "active"
    ROTATED = "rotated"  # replaced by a newer one at a refresh
    REVOKED = "revoked"
    EXPIRED = "expired"


@dataclass
class RefreshGrant:
    """What a refresh token stands for: who signed in, for which app and permissions."""

    client_id: str
    tenant_id: str
    account_upn: str
    scopes: tuple[str, ...]
    expires_at: float
    state: RefreshState = RefreshState.ACTIVE


# Entra forbids caching token answers; clients should not either.
NO_STORE_HEADERS = {"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"}


class OAuthError(Exception):
    """Raised when a token request fails; carries Entra's error, AADSTS code and description."""

    def __init__(self, status: int, error: str, aadsts: int, description: str) -> None:
        super().__init__(f"{error}: AADSTS{aadsts}: {description}")
        self.status = status
        self.error = error
        self.aadsts = aadsts
        self.description = description

    def response(self, correlation_id: str) -> SandboxResponse:
        """Entra's error body."""
        trace_id = str(uuid.uuid4())
        return SandboxResponse.of_json(
            self.status,
            {
                "error": self.error,
                "error_description": f"AADSTS{self.aadsts}: {self.description} "
                f"Trace ID: {trace_id} Correlation ID: {correlation_id} "
                f"Timestamp: {_timestamp()}",
                "error_codes": [self.aadsts],
                "timestamp": _timestamp(),
                "trace_id": trace_id,
                "correlation_id": correlation_id,
            },
        )


class TokenIssuer:
    """Issues and checks access tokens; the caller holds the lock."""

    def __init__(self, config: Callable[[], SandboxConfig], clock: Callable[[], float]) -> None:
        self._config = config
        self._clock = clock
        self._tokens: dict[str, IssuedToken] = {}
        self._codes: dict[str, AuthorizationCode] = {}
        self._refresh_tokens: dict[str, RefreshGrant] = {}
        # The Graph permissions the tenant has consented to; None grants whatever is asked.
        self.consented_scopes: tuple[str, ...] | None = None
        self.counts: Counter[str] = Counter()
        self._grants: dict[str, Callable[[str, dict[str, str]], SandboxResponse]] = {
            "client_credentials": self._client_credentials,
            "authorization_code": self._authorization_code,
            "refresh_token": self._refresh_token,
        }

    def token_request(
        self, tenant: str, headers: Mapping[str, str], body: bytes
    ) -> SandboxResponse:
        """Answer `POST /{tenant}/oauth2/v2.0/token`."""
        correlation_id = headers.get("client-request-id") or str(uuid.uuid4())
        try:
            form = dict(parse_qsl(body.decode(), keep_blank_values=True))
            form.update(_basic_credentials(headers.get("authorization", "")))
            config = self._config()
            if tenant.lower() not in {config.tenant_id.lower(), SANDBOX_DOMAIN}:
                raise OAuthError(
                    400,
                    "invalid_request",
                    90002,
                    f"Tenant '{tenant}' not found. Check to make sure you have the correct "
                    "tenant ID and are signing into the correct cloud.",
                )
            grant_type = _required(form, "grant_type")
            grant = self._grants.get(grant_type)
            if grant is None:
                raise OAuthError(
                    400,
                    "unsupported_grant_type",
                    70003,
                    f"The app requested an unsupported grant type '{grant_type}'.",
                )
            return grant(tenant, form)
        except OAuthError as exc:
            return exc.response(correlation_id)

    def check(self, token: str) -> IssuedToken | None:
        """The token's record if it was issued here and has not expired."""
        issued = self._tokens.get(token)
        if issued is None or self._clock() >= issued.expires_at:
            return None
        return issued

    def is_known(self, token: str) -> bool:
        """Whether the token was issued here, expired or not."""
        return token in self._tokens

    def expire_all(self) -> int:
        """Make every issued token expired now; returns how many there were."""
        for issued in self._tokens.values():
            issued.expires_at = -math.inf
        return len(self._tokens)

    def check_client(self, tenant: str, client_id: str) -> None:
        """Refuse a client id that is not the sandbox's app."""
        if client_id.lower() != self._config().client_id.lower():
            raise OAuthError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{tenant}'. This can happen if the application has not been installed by the "
                "administrator of the tenant or consented to by any user in the tenant.",
            )

    def grant(self, asked: Iterable[str]) -> tuple[str, ...]:
        """The scopes consent grants for `asked` (canonical names): Entra may grant others."""
        asked = tuple(asked)
        permissions = [scope for scope in asked if scope in GRAPH_PERMISSIONS]
        if self.consented_scopes is not None:
            permissions = list(self.consented_scopes)
        offline = (OFFLINE_ACCESS,) if OFFLINE_ACCESS in asked else ()
        return (*sorted(set(permissions)), *SIGN_IN_SCOPES, *offline)

    def issue_code(
        self,
        client_id: str,
        redirect_uri: str,
        account_upn: str,
        scopes: tuple[str, ...],
        code_challenge: str | None,
    ) -> str:
        """A new single-use authorization code."""
        code = secrets.token_urlsafe(TOKEN_BYTES)
        self._codes[code] = AuthorizationCode(
            client_id,
            redirect_uri,
            account_upn,
            scopes,
            code_challenge,
            self._clock() + CODE_LIFETIME_S,
        )
        self.counts["codes_issued"] += 1
        return code

    def revoke_refresh_tokens(self, account_upn: str) -> int:
        """Revoke every active refresh token of an account (a password reset does this)."""
        return self._retire(RefreshState.REVOKED, account_upn)

    def expire_refresh_tokens(self) -> int:
        """Make every active refresh token expired now."""
        return self._retire(RefreshState.EXPIRED, None)

    def oauth_stats(self) -> dict[str, Any]:
        """Counters of the delegated flow, as `GET /_sandbox/oauth` answers them."""
        active = sum(g.state is RefreshState.ACTIVE for g in self._refresh_tokens.values())
        return {
            "codes_issued": self.counts["codes_issued"],
            "codes_redeemed": self.counts["codes_redeemed"],
            "refreshes": self.counts["refreshes"],
            "refresh_tokens_active": active,
            "consented_scopes": None
            if self.consented_scopes is None
            else list(self.consented_scopes),
        }

    def permits(self, issued: IssuedToken, kind: RouteKind) -> bool:
        """Whether the token's permissions allow the route (app-only tokens may do anything)."""
        if issued.scopes is None:
            return True
        needed = PERMISSIONS_BY_ROUTE.get(kind)
        return needed is None or bool(needed & issued.scopes)

    def _retire(self, state: RefreshState, account_upn: str | None) -> int:
        retired = 0
        for grant in self._refresh_tokens.values():
            if grant.state is RefreshState.ACTIVE and (
                account_upn is None or grant.account_upn.lower() == account_upn.lower()
            ):
                grant.state = state
                retired += 1
        return retired

    def _authorization_code(self, tenant: str, form: dict[str, str]) -> SandboxResponse:
        client_id = _required(form, "client_id")
        self.check_client(tenant, client_id)
        self._check_secret_if_given(client_id, form)
        code = self._codes.get(_required(form, "code"))
        if code is None or code.client_id.lower() != client_id.lower():
            raise OAuthError(
                400, "invalid_grant", 70000, "The provided grant is invalid or malformed."
            )
        if code.redeemed:
            raise OAuthError(
                400,
                "invalid_grant",
                54005,
                "OAuth2 Authorization code was already redeemed, please retry with a new valid "
                "code or use an existing refresh token.",
            )
        # Single use even when this redemption fails: a stolen code gets one try at most.
        code.redeemed = True
        if self._clock() >= code.expires_at:
            raise OAuthError(
                400, "invalid_grant", 70008, "The provided authorization code has expired."
            )
        if form.get("redirect_uri") != code.redirect_uri:
            raise OAuthError(
                400,
                "invalid_grant",
                500112,
                "The reply address does not match the reply address provided when requesting "
                "Authorization code.",
            )
        if code.code_challenge is not None:
            verifier = _required(form, "code_verifier")
            if not secrets.compare_digest(_s256(verifier), code.code_challenge):
                raise OAuthError(
                    400,
                    "invalid_grant",
                    501481,
                    "The Code_Verifier does not match the code_challenge supplied in the "
                    "authorization request.",
                )
        self.counts["codes_redeemed"] += 1
        return self._issue_delegated(client_id, code.account_upn, code.scopes)

    def _refresh_token(self, tenant: str, form: dict[str, str]) -> SandboxResponse:
        client_id = _required(form, "client_id")
        self.check_client(tenant, client_id)
        self._check_secret_if_given(client_id, form)
        grant = self._refresh_tokens.get(_required(form, "refresh_token"))
        expired = grant is not None and self._clock() >= grant.expires_at
        if grant is not None and expired and grant.state is RefreshState.ACTIVE:
            grant.state = RefreshState.EXPIRED
        if grant is None or grant.client_id.lower() != client_id.lower():
            raise OAuthError(
                400, "invalid_grant", 9002313, "Invalid request. Request is malformed or invalid."
            )
        if grant.state is RefreshState.ROTATED:
            raise OAuthError(
                400,
                "invalid_grant",
                70008,
                "The provided refresh token has already been used to get a new one.",
            )
        if grant.state is RefreshState.REVOKED:
            raise OAuthError(
                400,
                "invalid_grant",
                50173,
                "The provided grant has expired due to it being revoked, a fresh auth token "
                "is needed. The user might have changed or reset their password.",
            )
        if grant.state is RefreshState.EXPIRED:
            raise OAuthError(
                400,
                "invalid_grant",
                700082,
                "The refresh token has expired due to inactivity.",
            )
        grant.state = RefreshState.ROTATED
        self.counts["refreshes"] += 1
        return self._issue_delegated(client_id, grant.account_upn, grant.scopes)

    def _check_secret_if_given(self, client_id: str, form: Mapping[str, str]) -> None:
        # The sandbox app is registered for public client flows too: a secret is optional.
        secret = form.get("client_secret")
        if secret and not secrets.compare_digest(secret, self._config().client_secret):
            raise _bad_secret(client_id)

    def _issue_delegated(
        self, client_id: str, account_upn: str, scopes: tuple[str, ...]
    ) -> SandboxResponse:
        config = self._config()
        lifetime_s = config.token_lifetime_s
        token = secrets.token_urlsafe(TOKEN_BYTES)
        permissions = frozenset(scope for scope in scopes if scope in GRAPH_PERMISSIONS)
        self._tokens[token] = IssuedToken(
            client_id, config.tenant_id, self._clock() + lifetime_s, permissions, account_upn
        )
        answer: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": " ".join(
                GRAPH_RESOURCE + scope if scope in GRAPH_PERMISSIONS else scope for scope in scopes
            ),
            "expires_in": lifetime_s,
            "ext_expires_in": lifetime_s,
            "access_token": token,
        }
        if OFFLINE_ACCESS in scopes:
            refresh_token = secrets.token_urlsafe(TOKEN_BYTES)
            self._refresh_tokens[refresh_token] = RefreshGrant(
                client_id,
                config.tenant_id,
                account_upn,
                scopes,
                self._clock() + REFRESH_TOKEN_LIFETIME_S,
            )
            answer["refresh_token"] = refresh_token
        return SandboxResponse.of_json(200, answer, NO_STORE_HEADERS)

    def _client_credentials(self, tenant: str, form: dict[str, str]) -> SandboxResponse:
        config = self._config()
        client_id = _required(form, "client_id")
        self.check_client(tenant, client_id)
        secret = form.get("client_secret")
        if not secret:
            raise OAuthError(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' "
                "or 'client_secret'.",
            )
        if not secrets.compare_digest(secret, config.client_secret):
            raise _bad_secret(client_id)
        scope = _required(form, "scope")
        if not scope.endswith(DEFAULT_SCOPE_SUFFIX) or " " in scope.strip():
            raise OAuthError(
                400,
                "invalid_scope",
                1002012,
                f"The provided value for scope {scope} is not valid. Client credential flows "
                "must have a scope value with /.default suffixed to the resource identifier "
                "(application ID URI).",
            )
        return self._issue(config.client_id, config.tenant_id)

    def _issue(self, client_id: str, tenant_id: str) -> SandboxResponse:
        lifetime_s = self._config().token_lifetime_s
        token = secrets.token_urlsafe(TOKEN_BYTES)
        self._tokens[token] = IssuedToken(client_id, tenant_id, self._clock() + lifetime_s)
        return SandboxResponse.of_json(
            200,
            {
                "token_type": "Bearer",
                "expires_in": lifetime_s,
                "ext_expires_in": lifetime_s,
                "access_token": token,
            },
            NO_STORE_HEADERS,
        )


def normalize_scope(scope: str) -> str | None:
    """The canonical name of a delegated scope, short or `https://graph.microsoft.com/` form."""
    name = scope.removeprefix(GRAPH_RESOURCE) if scope.lower().startswith(GRAPH_RESOURCE) else scope
    return _CANONICAL.get(name.lower())


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _bad_secret(client_id: str) -> OAuthError:
    return OAuthError(
        401,
        "invalid_client",
        7000215,
        "Invalid client secret provided. Ensure the secret being sent in the request "
        "is the client secret value, not the client secret ID, for a secret added to "
        f"app '{client_id}'.",
    )


def _required(form: Mapping[str, str], name: str) -> str:
    value = form.get(name)
    if not value:
        raise OAuthError(
            400,
            "invalid_request",
            900144,
            f"The request body must contain the following parameter: '{name}'.",
        )
    return value


def _basic_credentials(authorization: str) -> dict[str, str]:
    """Client id and secret from HTTP Basic auth (RFC 6749 2.3.1: each form-urlencoded)."""
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return {}
    try:
        client_id, _, secret = base64.b64decode(encoded).decode().partition(":")
    except ValueError:
        return {}
    return {"client_id": unquote_plus(client_id), "client_secret": unquote_plus(secret)}


def _timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
