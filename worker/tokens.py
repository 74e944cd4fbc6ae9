"""Graph access tokens: every token provider, and the one translation of token-endpoint errors.

An app-only connection asks for tokens with its client credentials. A delegated connection
holds one refresh token, and Entra rotates it at every refresh. Many worker processes share it,
so a refresh happens under a Redis lock, and whoever gets the lock first reads the stored tokens
again: a waiter finds the fresh access token its predecessor stored and uses it, instead of
refreshing with a refresh token that has just been replaced. An `invalid_grant` marks the
connection broken; from then on every call fails at once, without asking the token endpoint,
until someone runs `entraflow connect` again.

Running processes follow the stored connection: `entraflow connect` or `disconnect` while
workers run takes effect in each of them within `CONNECTION_RECHECK_S`, or at once when Graph
refuses the old connection's token.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urlsplit

import redis
import requests
from oauthlib.oauth2 import (
    BackendApplicationClient,
    InsecureTransportError,
    OAuth2Error,
    WebApplicationClient,
)
from pydantic import SecretStr
from requests_oauthlib import OAuth2Session
from sqlalchemy.exc import OperationalError

from entraflow.keys import CONNECTION_REFRESH_LOCK
from entraflow.redis_server import redis_url
from entraflow.secrets import SecretBox, SecretKeyError
from entraflow.settings import (
    DEFAULT_HTTP_TIMEOUT_S,
    DEFAULT_TOKEN_REFRESH_MARGIN_S,
    InsecureURLError,
    Settings,
    check_transport,
)
from models.connections import (
    Connection,
    ConnectionKind,
    ConnectionStatus,
    load_connection,
    mark_broken,
    replace_tokens,
)
from models.db import utcnow
from worker.errors import (
    FIRST_SERVER_ERROR_STATUS,
    AuthenticationError,
    GraphConnectionError,
    ServiceUnavailableError,
    ThrottledError,
    retry_after_s_of,
)
from worker.permissions import PUBLIC_GRAPH_SCOPE, scope_for_graph

TOKEN_ENDPOINT = "token"
# Entra's usual `expires_in`, assumed when an answer carries none.
ASSUMED_TOKEN_LIFETIME_S = 3599.0
# However large the configured margin, use a token for at least this share of its life.
MAX_REFRESH_MARGIN_FRACTION = 0.5
# React to the OAuth `error` code; the description is only mined for these two ids.
AADSTS_PATTERN = re.compile(r"\bAADSTS(\d+)\b")
TRACE_ID_PATTERN = re.compile(r"Trace ID: ([0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12})")
# OAuth errors the authorization server uses for its own trouble (RFC 6749, section 5.2).
TRANSIENT_OAUTH_ERRORS = frozenset({"server_error", "temporarily_unavailable"})
# The token endpoint refuses a refresh token or code that is revoked, expired or already used.
INVALID_GRANT = "invalid_grant"
RECONNECT_HINT = "run `entraflow connect` again"
HINTS_BY_AADSTS = {
    "7000215": "check ENTRAFLOW_CLIENT_SECRET",
    "7000222": "ENTRAFLOW_CLIENT_SECRET has expired: create a new one",
    "700016": "check ENTRAFLOW_CLIENT_ID and ENTRAFLOW_TENANT_ID",
    "90002": "check ENTRAFLOW_TENANT_ID",
}
HINTS_BY_OAUTH_ERROR = {
    "invalid_client": "check ENTRAFLOW_CLIENT_ID and ENTRAFLOW_CLIENT_SECRET",
    "unauthorized_client": "check ENTRAFLOW_CLIENT_ID and ENTRAFLOW_TENANT_ID",
    "invalid_request": "check ENTRAFLOW_TENANT_ID and ENTRAFLOW_AUTHORITY_URL",
    "invalid_scope": "check ENTRAFLOW_GRAPH_URL",
    # Only the refresh and code grants get it: a refresh token or a code is used up.
    INVALID_GRANT: RECONNECT_HINT,
}
DEFAULT_HINT = "check ENTRAFLOW_TENANT_ID, ENTRAFLOW_CLIENT_ID and ENTRAFLOW_CLIENT_SECRET"
# requests-oauthlib logs the token request body (our secret) and the token at DEBUG here.
OAUTH_SESSION_LOGGER = "requests_oauthlib.oauth2_session"
# oauthlib's only switch for plain http: a process-wide variable. An `Authority` sets it, and
# only for a URL it checked; every URL we hand oauthlib comes from an `Authority`, so the
# switch lets nothing else through, whatever the user set it to.
INSECURE_TRANSPORT_VARIABLE = "OAUTHLIB_INSECURE_TRANSPORT"
# A refresh lock outlives its holder's token request by this much, in seconds, so a holder that
# died mid-refresh blocks the others only briefly.
REFRESH_LOCK_SLACK_S = 10.0
# How often a process looks at the stored connection again, in seconds: a connection stored or
# removed while workers run is what they act as this long after, at most.
CONNECTION_RECHECK_S = 5.0

SessionFactory = Callable[[BackendApplicationClient], OAuth2Session]
DelegatedSessionFactory = Callable[[WebApplicationClient], OAuth2Session]
Clock = Callable[[], datetime]
Answer = TypeVar("Answer")


class TokenProvider(Protocol):
    """Anything that hands the Graph client a bearer token."""

    def token(self, rejected: str | None = None) -> str:
        """A valid access token, and never `rejected`, the one Graph just refused.

        Many threads may find the same token refused at once: the first fetches a new one and
        the others take it, instead of each fetching its own.
        """
        ...


class _DropDebugRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG


_DROP_DEBUG_RECORDS = _DropDebugRecords()


def hide_token_logs() -> None:
    """Drop requests-oauthlib's DEBUG records, which carry token request bodies and tokens."""
    logging.getLogger(OAUTH_SESSION_LOGGER).addFilter(_DROP_DEBUG_RECORDS)


def new_oauth2_session(client: BackendApplicationClient) -> OAuth2Session:
    """A plain requests-oauthlib session for `client`; tests pass one with a fake transport."""
    return OAuth2Session(client=client)


def new_delegated_session(client: WebApplicationClient) -> OAuth2Session:
    """A plain requests-oauthlib session for the authorization code and refresh grants."""
    return OAuth2Session(client=client)


class Authority:
    """The identity authority, its URL checked once: a secret may go to any of its endpoints."""

    def __init__(self, authority_url: str) -> None:
        try:
            check_transport(authority_url, "the identity endpoint")
        except InsecureURLError as exc:
            raise AuthenticationError(str(exc)) from exc
        # Endpoints only add a path, so each keeps the scheme and host checked here.
        self._base_url = authority_url.rstrip("/")
        self._plain_http = urlsplit(authority_url).scheme.lower() == "http"

    def endpoint(self, tenant_id: str, name: str) -> str:
        """`{authority}/{tenant}/oauth2/v2.0/{name}`."""
        return f"{self._base_url}/{quote(tenant_id, safe='')}/oauth2/v2.0/{name}"

    def call(self, tenant_id: str, name: str, send: Callable[[str], Answer]) -> Answer:
        """What `send` gets from endpoint `name`, its failures as our errors.

        OAuth error answers keep their code, AADSTS number and trace id, never the description,
        which may echo what we sent.
        """
        url = self.endpoint(tenant_id, name)
        if self._plain_http and os.environ.get(INSECURE_TRANSPORT_VARIABLE) != "1":
            os.environ[INSECURE_TRANSPORT_VARIABLE] = "1"
        try:
            return send(url)
        except InsecureTransportError as exc:
            # Only reachable when something unset the variable while `send` ran.
            raise AuthenticationError(
                f"oauthlib refused plain http to {url} ({INSECURE_TRANSPORT_VARIABLE} was unset)"
            ) from exc
        except OAuth2Error as exc:
            raise _refusal(exc) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise GraphConnectionError(
                f"token endpoint {url} did not answer ({type(exc).__name__})"
            ) from exc
        except requests.RequestException as exc:
            raise AuthenticationError(
                f"token request to {url} failed ({type(exc).__name__})"
            ) from exc


def refuse_unavailable(response: requests.Response) -> requests.Response:
    """Raise for a throttled or failing token endpoint before oauthlib parses its body."""
    # oauthlib would report an unreadable error page as a missing token.
    status = response.status_code
    retry_after_s = retry_after_s_of(response.headers)
    if status == HTTPStatus.TOO_MANY_REQUESTS:
        raise ThrottledError(
            "token endpoint throttled us", status=status, retry_after_s=retry_after_s
        )
    if status >= FIRST_SERVER_ERROR_STATUS:
        raise ServiceUnavailableError(
            "token endpoint unavailable", status=status, retry_after_s=retry_after_s
        )
    return response


def _refusal(exc: OAuth2Error) -> AuthenticationError | ServiceUnavailableError:
    """Our error for an OAuth error answer: its code and AADSTS number, never its description."""
    description = exc.description or ""
    aadsts_match = AADSTS_PATTERN.search(description)
    aadsts = aadsts_match.group(1) if aadsts_match else None
    trace_match = TRACE_ID_PATTERN.search(description)
    trace_id = trace_match.group(1) if trace_match else None
    error_code = exc.error or type(exc).__name__
    if error_code in TRANSIENT_OAUTH_ERRORS:
        return ServiceUnavailableError(
            f"token endpoint unavailable: {error_code}", code=error_code, request_id=trace_id
        )
    hint = HINTS_BY_AADSTS.get(aadsts or "") or HINTS_BY_OAUTH_ERROR.get(error_code, DEFAULT_HINT)
    number = f" (AADSTS{aadsts})" if aadsts else ""
    return AuthenticationError(
        f"token request refused: {error_code}{number}: {hint}",
        code=error_code,
        request_id=trace_id,
    )


def token_lifetime_s(answer: Mapping[str, Any], refresh_margin_s: float) -> tuple[float, float]:
    """The answer's token lifetime, and how long before its end to refresh it, in seconds."""
    lifetime_s = float(answer.get("expires_in") or ASSUMED_TOKEN_LIFETIME_S)
    return lifetime_s, min(refresh_margin_s, lifetime_s * MAX_REFRESH_MARGIN_FRACTION)


def token_expiry(
    answer: Mapping[str, Any], requested_at: datetime, refresh_margin_s: float
) -> tuple[datetime, datetime]:
    """When the answer's access token expires, and when to refresh it (a margin before)."""
    lifetime_s, margin_s = token_lifetime_s(answer, refresh_margin_s)
    expires_at = requested_at + timedelta(seconds=lifetime_s)
    return expires_at, expires_at - timedelta(seconds=margin_s)


class ClientCredentialsTokenProvider:
    """Fetches app-only tokens from `{authority}/{tenant}/oauth2/v2.0/token`, one at a time."""

    def __init__(
        self,
        authority_url: str,
        tenant_id: str,
        client_id: str,
        client_secret: SecretStr,
        *,
        scope: str = PUBLIC_GRAPH_SCOPE,
        session_factory: SessionFactory = new_oauth2_session,
        refresh_margin_s: float = DEFAULT_TOKEN_REFRESH_MARGIN_S,
        timeout_s: float = DEFAULT_HTTP_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Checked now, so a provider that could leak its secret is never built.
        self._authority = Authority(authority_url)
        self._tenant_id = tenant_id
        self.scope = scope
        self._client_secret = client_secret
        self._refresh_margin_s = refresh_margin_s
        self._timeout_s = timeout_s
        self._clock = clock
        # No scope on the session or its client: oauthlib then has nothing to compare Entra's
        # answer with, and does not raise "Scope has changed" (no OAUTHLIB_RELAX_TOKEN_SCOPE).
        self._session = session_factory(BackendApplicationClient(client_id=client_id))
        self._session.register_compliance_hook("access_token_response", refuse_unavailable)
        hide_token_logs()
        self._lock = threading.Lock()
        self._access_token: str | None = None
        self._refresh_at = 0.0

    @classmethod
    def from_settings(
        cls, settings: Settings, *, session_factory: SessionFactory = new_oauth2_session
    ) -> ClientCredentialsTokenProvider:
        """The provider for the app-only connection `settings` describe."""
        tenant_id, client_id = settings.tenant_id, settings.client_id
        secret = settings.client_secret
        if not tenant_id or not client_id or secret is None or not secret.get_secret_value():
            missing = [
                variable
                for variable, value in (
                    ("ENTRAFLOW_TENANT_ID", tenant_id),
                    ("ENTRAFLOW_CLIENT_ID", client_id),
                    ("ENTRAFLOW_CLIENT_SECRET", secret.get_secret_value() if secret else None),
                )
                if not value
            ]
            raise AuthenticationError(
                f"{', '.join(missing)} not set: an app-only Graph connection needs "
                "ENTRAFLOW_TENANT_ID, ENTRAFLOW_CLIENT_ID and ENTRAFLOW_CLIENT_SECRET"
            )
        return cls(
            settings.authority_url,
            tenant_id,
            client_id,
            secret,
            scope=scope_for_graph(settings.graph_url),
            session_factory=session_factory,
            refresh_margin_s=settings.token_refresh_margin_s,
            timeout_s=settings.http_timeout_s,
        )

    @property
    def token_url(self) -> str:
        """Where the tokens come from."""
        return self._authority.endpoint(self._tenant_id, TOKEN_ENDPOINT)

    def token(self, rejected: str | None = None) -> str:
        """The cached access token, fetched anew when `rejected` or close to expiry."""
        with self._lock:
            if (
                self._access_token is None
                or self._access_token == rejected
                or self._clock() >= self._refresh_at
            ):
                self._access_token, self._refresh_at = self._fetch()
            return self._access_token

    def _fetch(self) -> tuple[str, float]:
        requested_at = self._clock()
        answer = self._authority.call(
            self._tenant_id,
            TOKEN_ENDPOINT,
            lambda url: self._session.fetch_token(
                url,
                client_secret=self._client_secret.get_secret_value(),
                # Entra wants client_id and client_secret in the form body (GRAPH.md).
                include_client_id=True,
                scope=[self.scope],
                timeout=self._timeout_s,
            ),
        )
        lifetime_s, margin_s = token_lifetime_s(answer, self._refresh_margin_s)
        return str(answer["access_token"]), requested_at + lifetime_s - margin_s


def connection_identity(settings: Settings) -> tuple[str | None, str | None]:
    """The app (client) id and tenant id Graph counts our requests against."""
    connection = load_connection(settings.resolved_database_url)
    if connection is not None:
        return connection.client_id, connection.tenant_id
    return settings.client_id, settings.tenant_id


def token_provider_for(
    settings: Settings, *, token_session_factory: SessionFactory = new_oauth2_session
) -> TokenProvider:
    """The token provider of the connection stored now, followed as it changes."""
    return StoredConnectionTokenProvider(settings, token_session_factory=token_session_factory)


# What tells one stored connection from the next: `connect` stores a new one, with a new time.
ConnectionIdentity = tuple[ConnectionKind, datetime] | None


def _identity_of(connection: Connection | None) -> ConnectionIdentity:
    return None if connection is None else (connection.kind, connection.connected_at)


class StoredConnectionTokenProvider:
    """Tokens of the stored connection, or else of the app-only one `settings` describe.

    A process caches its Graph client for its whole life, so this looks at the stored
    connection again now and then, and whenever a token or the connection was refused, and
    switches providers when `entraflow connect` or `disconnect` changed it.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        token_session_factory: SessionFactory = new_oauth2_session,
        recheck_s: float = CONNECTION_RECHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._token_session_factory = token_session_factory
        self._recheck_s = recheck_s
        self._clock = clock
        self._lock = threading.Lock()
        # Built now, so a connection that cannot be used fails where the client is made.
        connection = load_connection(settings.resolved_database_url)
        self._identity = _identity_of(connection)
        self._provider = _provider_for(settings, connection, token_session_factory)
        self._checked_at = clock()

    def token(self, rejected: str | None = None) -> str:
        """A valid access token of the connection stored now, never `rejected`."""
        # A refused token may mean the connection was replaced: one read tells.
        provider = self._current(recheck=rejected is not None)
        try:
            return provider.token(rejected)
        except AuthenticationError:
            # A broken or removed connection may have been replaced since we last looked.
            replaced = self._current(recheck=True)
            if replaced is provider:
                raise
            return replaced.token()

    def _current(self, *, recheck: bool) -> TokenProvider:
        with self._lock:
            now = self._clock()
            if recheck or now >= self._checked_at + self._recheck_s:
                self._checked_at = now
                try:
                    connection = load_connection(self._settings.resolved_database_url)
                except OperationalError:
                    # The database is away: a Graph call needs no database, so go on as the
                    # connection last seen, and look again after the interval.
                    return self._provider
                identity = _identity_of(connection)
                if identity != self._identity:
                    self._provider = _provider_for(
                        self._settings, connection, self._token_session_factory
                    )
                    self._identity = identity
            return self._provider


def _provider_for(
    settings: Settings, connection: Connection | None, token_session_factory: SessionFactory
) -> TokenProvider:
    """The provider of `connection`, or of the app-only connection `settings` describe."""
    if connection is None:
        return ClientCredentialsTokenProvider.from_settings(
            settings, session_factory=token_session_factory
        )
    try:
        box = SecretBox.from_settings(settings)
    except SecretKeyError as exc:
        raise AuthenticationError(f"cannot open the stored connection: {exc}") from exc
    if connection.kind is ConnectionKind.APP:
        return ClientCredentialsTokenProvider(
            settings.authority_url,
            connection.tenant_id,
            connection.client_id,
            SecretStr(_open(box, connection.client_secret_ciphertext or "")),
            scope=scope_for_graph(settings.graph_url),
            session_factory=token_session_factory,
            refresh_margin_s=settings.token_refresh_margin_s,
            timeout_s=settings.http_timeout_s,
        )
    return DelegatedTokenProvider(settings, box, redis.Redis.from_url(redis_url(settings)))


class DelegatedTokenProvider:
    """Access tokens of the stored delegated connection, refreshed once for all processes."""

    def __init__(
        self,
        settings: Settings,
        box: SecretBox,
        lock_client: redis.Redis,
        *,
        session_factory: DelegatedSessionFactory = new_delegated_session,
        clock: Clock = utcnow,
    ) -> None:
        hide_token_logs()
        # Checked now: the refresh token and client secret go nowhere else.
        self._authority = Authority(settings.authority_url)
        self._database_url = settings.resolved_database_url
        self._margin_s = settings.token_refresh_margin_s
        self._timeout_s = settings.http_timeout_s
        self._box = box
        self._lock_client = lock_client
        self._session_factory = session_factory
        self._clock = clock
        self._lock = threading.Lock()
        self._access_token: str | None = None
        self._refresh_at = datetime.min.replace(tzinfo=UTC)

    def token(self, rejected: str | None = None) -> str:
        """A valid access token, never `rejected`."""
        with self._lock:
            token = self._access_token
            if token is not None and token != rejected and self._clock() < self._refresh_at:
                return token
            self._access_token = None
            usable = self._usable(load_connection(self._database_url), rejected)
            if usable is None:
                usable = self._refresh_under_lock(rejected)
            self._access_token, self._refresh_at = usable
            return self._access_token

    def _usable(
        self, connection: Connection | None, rejected: str | None
    ) -> tuple[str, datetime] | None:
        """The stored access token if it is fresh and not the one Graph refused."""
        connection = _connected(connection)
        refresh_at = connection.access_token_refresh_at
        if connection.access_token_ciphertext is None or refresh_at is None:
            return None
        if self._clock() >= refresh_at:
            return None
        token = self._decrypt(connection.access_token_ciphertext)
        return None if token == rejected else (token, refresh_at)

    def _refresh_under_lock(self, rejected: str | None) -> tuple[str, datetime]:
        # A waiter waits as long as a holder may hold the lock: by then it is done or gone.
        hold_s = self._timeout_s + REFRESH_LOCK_SLACK_S
        lock = self._lock_client.lock(
            CONNECTION_REFRESH_LOCK, timeout=hold_s, blocking_timeout=hold_s
        )
        try:
            acquired = lock.acquire()
        except redis.RedisError as exc:
            raise GraphConnectionError(
                f"cannot take the token refresh lock in Redis ({type(exc).__name__})"
            ) from exc
        if not acquired:
            raise GraphConnectionError("another process is still refreshing the Graph token")
        try:
            connection = load_connection(self._database_url)
            # Whoever held the lock before us may have refreshed already: use theirs.
            usable = self._usable(connection, rejected)
            if usable is not None:
                return usable
            return self._refresh(_connected(connection))
        finally:
            # LockError: it expired while we refreshed; nothing of ours is left to release.
            with contextlib.suppress(redis.exceptions.LockError):
                lock.release()

    def _refresh(self, connection: Connection) -> tuple[str, datetime]:
        used = connection.refresh_token_ciphertext
        if used is None:
            raise AuthenticationError(
                f"the stored connection has no refresh token: {RECONNECT_HINT}"
            )
        secret = (
            self._decrypt(connection.client_secret_ciphertext)
            if connection.client_secret_ciphertext
            else None
        )
        session = self._session_factory(WebApplicationClient(connection.client_id))
        session.register_compliance_hook("refresh_token_response", refuse_unavailable)
        # Entra wants the client in the form body; a public client has no secret.
        client: dict[str, Any] = {"client_id": connection.client_id}
        if secret:
            client["client_secret"] = secret
        requested_at = self._clock()
        try:
            answer = self._authority.call(
                connection.tenant_id,
                TOKEN_ENDPOINT,
                lambda url: session.refresh_token(
                    url, refresh_token=self._decrypt(used), timeout=self._timeout_s, **client
                ),
            )
        except AuthenticationError as exc:
            if exc.code == INVALID_GRANT:
                reason = f"Entra refused the refresh token{_aadsts_suffix(exc)}: {RECONNECT_HINT}"
                if mark_broken(self._database_url, reason, used_refresh_ciphertext=used):
                    raise AuthenticationError(
                        f"the connection is broken: {reason}",
                        code=INVALID_GRANT,
                        request_id=exc.request_id,
                    ) from exc
                # The token was replaced while we asked (a lock that expired): use the new one.
                usable = self._usable(load_connection(self._database_url), None)
                if usable is not None:
                    return usable
            raise
        expires_at, refresh_at = token_expiry(answer, requested_at, self._margin_s)
        access_token = str(answer["access_token"])
        # Entra may keep the refresh token; requests-oauthlib then hands back the one we sent.
        replace_tokens(
            self._database_url,
            used_refresh_ciphertext=used,
            refresh_ciphertext=self._box.encrypt(str(answer["refresh_token"])),
            access_ciphertext=self._box.encrypt(access_token),
            expires_at=expires_at,
            refresh_at=refresh_at,
            scopes=str(answer.get("scope") or connection.scopes),
        )
        return access_token, refresh_at

    def _decrypt(self, ciphertext: str) -> str:
        return _open(self._box, ciphertext)


def _open(box: SecretBox, ciphertext: str) -> str:
    try:
        return box.decrypt(ciphertext)
    except SecretKeyError as exc:
        raise AuthenticationError(f"cannot open the stored connection: {exc}") from exc


def _connected(connection: Connection | None) -> Connection:
    """The connection if it can be used; fails fast when it is missing or broken."""
    if connection is None or connection.kind is not ConnectionKind.DELEGATED:
        raise AuthenticationError(f"there is no delegated connection any more: {RECONNECT_HINT}")
    if connection.status is ConnectionStatus.BROKEN:
        raise AuthenticationError(
            f"the connection is broken: {connection.broken_reason or RECONNECT_HINT}",
            code=INVALID_GRANT,
        )
    return connection


def _aadsts_suffix(exc: AuthenticationError) -> str:
    found = AADSTS_PATTERN.search(exc.message)
    return f" (AADSTS{found.group(1)})" if found else ""
