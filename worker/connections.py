"""The stored connection to Entra: connecting, the token provider it gives, refreshing it.

A delegated connection holds one refresh token, and Entra rotates it at every refresh. Many
worker processes share it, so a refresh happens under a Redis lock, and whoever gets the lock
first reads the stored tokens again: a waiter finds the fresh access token its predecessor
stored and uses it, instead of refreshing with a refresh token that has just been replaced.
An `invalid_grant` marks the connection broken; from then on every call fails at once, without
asking the token endpoint, until someone runs `entraflow connect` again.

Running processes follow the stored connection: `entraflow connect` or `disconnect` while
workers run takes effect in each of them within `CONNECTION_RECHECK_S`, or at once when Graph
refuses the old connection's token.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import redis
import requests
from oauthlib.oauth2 import InsecureTransportError, OAuth2Error, WebApplicationClient
from pydantic import SecretStr
from requests_oauthlib import OAuth2Session
from sqlalchemy.exc import OperationalError

from entraflow.keys import CONNECTION_REFRESH_LOCK
from entraflow.redis_server import redis_url
from entraflow.secrets import SecretBox, SecretKeyError
from entraflow.settings import Settings, check_transport
from models.connections import (
    Connection,
    ConnectionKind,
    ConnectionStatus,
    load_connection,
    mark_broken,
    replace_tokens,
    save_connection,
)
from models.db import utcnow
from worker.auth import (
    AADSTS_PATTERN,
    ASSUMED_TOKEN_LIFETIME_S,
    MAX_REFRESH_MARGIN_FRACTION,
    TRANSIENT_OAUTH_ERRORS,
    ClientCredentialsTokenProvider,
    SessionFactory,
    TokenProvider,
    admit_token_url,
    delegated_scopes,
    hide_token_logs,
    insecure_transport_message,
    new_oauth2_session,
    refuse_unavailable,
    scope_for_graph,
)
from worker.errors import AuthenticationError, GraphConnectionError, ServiceUnavailableError

PKCE_METHOD = "S256"
# The token endpoint refuses a refresh token that is revoked, expired or already replaced.
INVALID_GRANT = "invalid_grant"
# A refresh lock outlives its holder's token request by this much, in seconds, so a holder that
# died mid-refresh blocks the others only briefly.
REFRESH_LOCK_SLACK_S = 10.0
RECONNECT_HINT = "run `entraflow connect` again"
# How often a process looks at the stored connection again, in seconds: a connection stored or
# removed while workers run is what they act as this long after, at most.
CONNECTION_RECHECK_S = 5.0
# Who signed in: the cheapest read that names them (GET /me needs no more than User.Read.All).
ME_PATH = "/me"
ME_QUERY = "$select=userPrincipalName"

DelegatedSessionFactory = Callable[[WebApplicationClient], OAuth2Session]
Clock = Callable[[], datetime]


def new_delegated_session(client: WebApplicationClient) -> OAuth2Session:
    """A plain requests-oauthlib session for the authorization code and refresh grants."""
    return OAuth2Session(client=client)


def oauth_url(authority_url: str, tenant_id: str, endpoint: str) -> str:
    """`{authority}/{tenant}/oauth2/v2.0/{endpoint}`."""
    return f"{authority_url.rstrip('/')}/{quote(tenant_id, safe='')}/oauth2/v2.0/{endpoint}"


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
    authorize_url = oauth_url(settings.authority_url, tenant_id, "authorize")
    admit_token_url(authorize_url)
    try:
        url, state = session.authorization_url(authorize_url, **extra)
    except InsecureTransportError as exc:
        raise AuthenticationError(insecure_transport_message(authorize_url)) from exc
    # Entra answers with other scopes than asked; with none to compare, oauthlib keeps its
    # answer instead of raising "Scope has changed" (no process-wide OAUTHLIB_RELAX_TOKEN_SCOPE).
    session.scope = None
    return PendingSignIn(url, state, redirect_uri, scopes, tenant_id, client_id, session)


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
    token_url = oauth_url(settings.authority_url, pending.tenant_id, "token")
    admit_token_url(token_url)
    pending.session.register_compliance_hook("access_token_response", refuse_unavailable)
    answer = _call_token_endpoint(
        token_url,
        lambda: pending.session.fetch_token(
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
    expires_at, refresh_at = _expiry(answer, now, settings.token_refresh_margin_s)
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

    def token(self, force_refresh: bool = False) -> str:
        """A valid access token of the connection stored now."""
        # A refused token may mean the connection was replaced: one read tells.
        provider = self._current(recheck=force_refresh)
        try:
            return provider.token(force_refresh)
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
        self._database_url = settings.resolved_database_url
        self._authority_url = settings.authority_url
        self._margin_s = settings.token_refresh_margin_s
        self._timeout_s = settings.http_timeout_s
        self._box = box
        self._lock_client = lock_client
        self._session_factory = session_factory
        self._clock = clock
        self._lock = threading.Lock()
        self._access_token: str | None = None
        self._refresh_at = datetime.min.replace(tzinfo=UTC)

    def token(self, force_refresh: bool = False) -> str:
        """A valid access token; with `force_refresh`, one other than the last handed out."""
        with self._lock:
            if not force_refresh and self._access_token and self._clock() < self._refresh_at:
                return self._access_token
            rejected = self._access_token if force_refresh else None
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
        token_url = oauth_url(self._authority_url, connection.tenant_id, "token")
        admit_token_url(token_url)
        session = self._session_factory(WebApplicationClient(connection.client_id))
        session.register_compliance_hook("refresh_token_response", refuse_unavailable)
        # Entra wants the client in the form body; a public client has no secret.
        client: dict[str, Any] = {"client_id": connection.client_id}
        if secret:
            client["client_secret"] = secret
        requested_at = self._clock()
        try:
            answer = _call_token_endpoint(
                token_url,
                lambda: session.refresh_token(
                    token_url, refresh_token=self._decrypt(used), timeout=self._timeout_s, **client
                ),
            )
        except AuthenticationError as exc:
            if exc.code == INVALID_GRANT:
                reason = f"Entra refused the refresh token{_aadsts_suffix(exc)}: {RECONNECT_HINT}"
                if mark_broken(self._database_url, reason, used_refresh_ciphertext=used):
                    raise AuthenticationError(
                        f"the connection is broken: {reason}", code=INVALID_GRANT
                    ) from exc
                # The token was replaced while we asked (a lock that expired): use the new one.
                usable = self._usable(load_connection(self._database_url), None)
                if usable is not None:
                    return usable
            raise
        expires_at, refresh_at = _expiry(answer, requested_at, self._margin_s)
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


def _call_token_endpoint(
    token_url: str, call: Callable[[], Mapping[str, Any]]
) -> Mapping[str, Any]:
    """`call`'s token answer, its failures as our errors (codes and AADSTS numbers only)."""
    try:
        return call()
    except InsecureTransportError as exc:
        raise AuthenticationError(insecure_transport_message(token_url)) from exc
    except OAuth2Error as exc:
        error_code = exc.error or type(exc).__name__
        aadsts = AADSTS_PATTERN.search(exc.description or "")
        number = f" (AADSTS{aadsts.group(1)})" if aadsts else ""
        if error_code in TRANSIENT_OAUTH_ERRORS:
            raise ServiceUnavailableError(
                f"token endpoint unavailable: {error_code}", code=error_code
            ) from exc
        raise AuthenticationError(
            f"token request refused: {error_code}{number}", code=error_code
        ) from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise GraphConnectionError(
            f"token endpoint {token_url} did not answer ({type(exc).__name__})"
        ) from exc
    except requests.RequestException as exc:
        raise AuthenticationError(
            f"token request to {token_url} failed ({type(exc).__name__})"
        ) from exc


def _aadsts_suffix(exc: AuthenticationError) -> str:
    found = AADSTS_PATTERN.search(exc.message)
    return f" (AADSTS{found.group(1)})" if found else ""


def _expiry(
    answer: Mapping[str, Any], requested_at: datetime, margin_s: float
) -> tuple[datetime, datetime]:
    """When the access token expires, and when to refresh it (a margin before)."""
    lifetime_s = float(answer.get("expires_in") or ASSUMED_TOKEN_LIFETIME_S)
    margin_s = min(margin_s, lifetime_s * MAX_REFRESH_MARGIN_FRACTION)
    expires_at = requested_at + timedelta(seconds=lifetime_s)
    return expires_at, expires_at - timedelta(seconds=margin_s)


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
