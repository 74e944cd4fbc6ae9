"""The identity platform's token endpoint and the access tokens it issues.

Each grant type is one method in `TokenIssuer._grants`, so authorization-code and refresh grants
can be added beside client credentials without touching the rest.
"""

from __future__ import annotations

import base64
import math
import secrets
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import parse_qsl, unquote_plus

from sandbox.config import SandboxConfig
from sandbox.directory import SANDBOX_DOMAIN
from sandbox.responses import SandboxResponse

# Bytes of randomness in an access token (tokens are opaque, not JWTs).
TOKEN_BYTES = 32
# Client credentials must ask for a resource's `/.default` scope.
DEFAULT_SCOPE_SUFFIX = "/.default"


@dataclass
class IssuedToken:
    """An access token: the app and tenant it was issued to and when it stops working."""

    client_id: str
    tenant_id: str
    expires_at: float


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
        self._grants: dict[str, Callable[[str, dict[str, str]], SandboxResponse]] = {
            "client_credentials": self._client_credentials,
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

    def _client_credentials(self, tenant: str, form: dict[str, str]) -> SandboxResponse:
        config = self._config()
        client_id = _required(form, "client_id")
        if client_id.lower() != config.client_id.lower():
            raise OAuthError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{tenant}'. This can happen if the application has not been installed by the "
                "administrator of the tenant or consented to by any user in the tenant.",
            )
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
            raise OAuthError(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request "
                "is the client secret value, not the client secret ID, for a secret added to "
                f"app '{client_id}'.",
            )
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
            # Entra forbids caching token answers; clients should not either.
            {"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"},
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
