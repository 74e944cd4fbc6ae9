"""Graph access tokens: app-only ones (client credentials), and the permissions actions need."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol
from urllib.parse import quote, urlsplit

import requests
from oauthlib.oauth2 import BackendApplicationClient, InsecureTransportError, OAuth2Error
from pydantic import SecretStr
from requests_oauthlib import OAuth2Session

from entraflow.settings import (
    DEFAULT_HTTP_TIMEOUT_S,
    DEFAULT_TOKEN_REFRESH_MARGIN_S,
    InsecureURLError,
    Settings,
    check_transport,
    is_loopback_host,
)
from worker.errors import (
    FIRST_SERVER_ERROR_STATUS,
    RETRY_AFTER_HEADER,
    AuthenticationError,
    GraphConnectionError,
    ServiceUnavailableError,
    ThrottledError,
    parse_retry_after,
)

# The public cloud's Graph, and the sandbox's, which stands in for it on loopback. Every other
# Graph host (the national clouds: graph.microsoft.us, dod-graph.microsoft.us,
# microsoftgraph.chinacloudapi.cn) is its own resource, with its own `.default` scope.
PUBLIC_GRAPH_SCOPE = "https://graph.microsoft.com/.default"
DEFAULT_SCOPE_SUFFIX = "/.default"
# Entra's usual `expires_in`, assumed when an answer carries none.
ASSUMED_TOKEN_LIFETIME_S = 3599.0
# However large the configured margin, use a token for at least this share of its life.
MAX_REFRESH_MARGIN_FRACTION = 0.5
# React to the OAuth `error` code; the description is only mined for these two ids.
AADSTS_PATTERN = re.compile(r"\bAADSTS(\d+)\b")
TRACE_ID_PATTERN = re.compile(r"Trace ID: ([0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12})")
# OAuth errors the authorization server uses for its own trouble (RFC 6749, section 5.2).
TRANSIENT_OAUTH_ERRORS = frozenset({"server_error", "temporarily_unavailable"})
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
}
DEFAULT_HINT = "check ENTRAFLOW_TENANT_ID, ENTRAFLOW_CLIENT_ID and ENTRAFLOW_CLIENT_SECRET"
# requests-oauthlib logs the token request body (our secret) and the token at DEBUG here.
OAUTH_SESSION_LOGGER = "requests_oauthlib.oauth2_session"
# oauthlib's only switch for plain http: a process-wide variable. `admit_token_url` sets it, and
# only for a loopback URL; every URL we hand oauthlib passes `admit_token_url` first, so the
# switch lets nothing else through, whatever the user set it to.
INSECURE_TRANSPORT_VARIABLE = "OAUTHLIB_INSECURE_TRANSPORT"

# The least-privileged delegated Graph permission of each action (GRAPH.md).
LEAST_PRIVILEGE_BY_ACTION = {
    "lookup_user": "User.Read.All",
    "lookup_group": "GroupMember.Read.All",
    "add_user_to_group": "GroupMember.ReadWrite.All",
    "remove_member_from_group": "GroupMember.ReadWrite.All",
}
_GROUP_WRITERS = frozenset(
    {"GroupMember.ReadWrite.All", "Group.ReadWrite.All", "Directory.ReadWrite.All"}
)
# Graph accepts a more privileged permission in place of the least one: any of these will do.
SUFFICIENT_PERMISSIONS_BY_ACTION = {
    "lookup_user": frozenset(
        {"User.Read.All", "User.ReadWrite.All", "Directory.Read.All", "Directory.ReadWrite.All"}
    ),
    "lookup_group": _GROUP_WRITERS
    | {"GroupMember.Read.All", "Group.Read.All", "Directory.Read.All"},
    "add_user_to_group": _GROUP_WRITERS,
    "remove_member_from_group": _GROUP_WRITERS,
}
# Asked besides the permissions: without it Entra issues no refresh token.
OFFLINE_ACCESS = "offline_access"
# Sign-in scopes Entra lists in its answer; they grant nothing in the directory.
SIGN_IN_SCOPES = frozenset({"openid", "profile", "email", OFFLINE_ACCESS})

SessionFactory = Callable[[BackendApplicationClient], OAuth2Session]


class TokenProvider(Protocol):
    """Anything that hands the Graph client a bearer token."""

    def token(self, force_refresh: bool = False) -> str:
        """A valid access token; a fresh one when `force_refresh`."""
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


def admit_token_url(url: str) -> None:
    """Refuse `url` unless a secret may go there; let oauthlib use it if it is loopback http."""
    try:
        check_transport(url, "the identity endpoint")
    except InsecureURLError as exc:
        raise AuthenticationError(str(exc)) from exc
    if (
        urlsplit(url).scheme.lower() == "http"
        and os.environ.get(INSECURE_TRANSPORT_VARIABLE) != "1"
    ):
        os.environ[INSECURE_TRANSPORT_VARIABLE] = "1"


def scope_for_graph(graph_url: str) -> str:
    """The `.default` scope of the Graph at `graph_url`: its cloud's, or the public one (sandbox).

    A host we do not know gets its own scope too: Entra then refuses it (`invalid_scope`) or
    issues a token for that resource alone, never one that opens the public Graph.
    """
    parts = urlsplit(check_transport(graph_url, "the Graph URL"))
    host = (parts.hostname or "").removesuffix(".")
    # Plain http reaches only the sandbox (loopback, or a host ENTRAFLOW_PLAIN_HTTP_HOSTS names).
    if is_loopback_host(host) or parts.scheme.lower() == "http":
        return PUBLIC_GRAPH_SCOPE
    # An address literal keeps its brackets; a port or user:password never belongs to a scope.
    resource_host = f"[{host}]" if ":" in host else host
    return f"https://{resource_host}{DEFAULT_SCOPE_SUFFIX}"


def graph_resource(graph_url: str) -> str:
    """The Graph resource scopes are prefixed with, e.g. `https://graph.microsoft.com/`."""
    return scope_for_graph(graph_url).removesuffix(DEFAULT_SCOPE_SUFFIX) + "/"


def delegated_scopes(graph_url: str) -> list[str]:
    """The scopes to ask a signing-in account for: least privilege for every action."""
    resource = graph_resource(graph_url)
    permissions = sorted(set(LEAST_PRIVILEGE_BY_ACTION.values()))
    return [resource + permission for permission in permissions] + [OFFLINE_ACCESS]


def permission_name(scope: str) -> str:
    """`User.Read.All` for `https://graph.microsoft.com/User.Read.All` (any resource) or itself."""
    if "://" in scope:
        return scope.rsplit("/", 1)[-1]
    return scope


@dataclass(frozen=True)
class ScopeReview:
    """Granted permissions against the actions' needs."""

    granted: tuple[str, ...]
    # Each disabled action and the least-privileged permission it lacks.
    missing: dict[str, str]
    # Granted Graph permissions no action needs.
    extra: tuple[str, ...]

    @property
    def available_actions(self) -> list[str]:
        """The actions the granted permissions allow."""
        return [action for action in LEAST_PRIVILEGE_BY_ACTION if action not in self.missing]

    @property
    def has_refresh(self) -> bool:
        """Whether `offline_access` was granted, so the connection outlives its access token."""
        return OFFLINE_ACCESS in {scope.lower() for scope in self.granted}


def review_scopes(granted: Iterable[str]) -> ScopeReview:
    """Which actions the granted scopes allow, and which granted permissions exceed the need."""
    names = tuple(permission_name(scope) for scope in granted)
    # Entra compares permission names without regard to case.
    lowered = {name.lower() for name in names}
    missing = {
        action: LEAST_PRIVILEGE_BY_ACTION[action]
        for action, sufficient in SUFFICIENT_PERMISSIONS_BY_ACTION.items()
        if not lowered & {name.lower() for name in sufficient}
    }
    needed = {name.lower() for name in LEAST_PRIVILEGE_BY_ACTION.values()}
    extra = tuple(
        name for name in names if name.lower() not in needed and name.lower() not in SIGN_IN_SCOPES
    )
    return ScopeReview(names, missing, extra)


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
        tenant_segment = quote(tenant_id, safe="")
        self.token_url = f"{authority_url.rstrip('/')}/{tenant_segment}/oauth2/v2.0/token"
        # Checked now, so a provider that could leak its secret is never built.
        admit_token_url(self.token_url)
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

    def token(self, force_refresh: bool = False) -> str:
        """The cached access token, fetched anew when forced or close to expiry."""
        with self._lock:
            if force_refresh or self._access_token is None or self._clock() >= self._refresh_at:
                self._access_token, self._refresh_at = self._fetch()
            return self._access_token

    def _fetch(self) -> tuple[str, float]:
        requested_at = self._clock()
        admit_token_url(self.token_url)
        try:
            answer = self._session.fetch_token(
                self.token_url,
                client_secret=self._client_secret.get_secret_value(),
                # Entra wants client_id and client_secret in the form body (GRAPH.md).
                include_client_id=True,
                scope=[self.scope],
                timeout=self._timeout_s,
            )
        except InsecureTransportError as exc:
            raise AuthenticationError(insecure_transport_message(self.token_url)) from exc
        except OAuth2Error as exc:
            raise _refusal(exc) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise GraphConnectionError(
                f"token endpoint {self.token_url} did not answer ({type(exc).__name__})"
            ) from exc
        except requests.RequestException as exc:
            raise AuthenticationError(
                f"token request to {self.token_url} failed ({type(exc).__name__})"
            ) from exc
        lifetime_s = float(answer.get("expires_in") or ASSUMED_TOKEN_LIFETIME_S)
        margin_s = min(self._refresh_margin_s, lifetime_s * MAX_REFRESH_MARGIN_FRACTION)
        return str(answer["access_token"]), requested_at + lifetime_s - margin_s


def insecure_transport_message(url: str) -> str:
    """Why oauthlib refused `url`, which `admit_token_url` had admitted."""
    # Only reachable when something unset the variable between the two.
    return f"oauthlib refused plain http to {url} ({INSECURE_TRANSPORT_VARIABLE} was unset)"


def refuse_unavailable(response: requests.Response) -> requests.Response:
    """Raise for a throttled or failing token endpoint before oauthlib parses its body."""
    # oauthlib would report an unreadable error page as a missing token.
    status = response.status_code
    retry_after_s = parse_retry_after(response.headers.get(RETRY_AFTER_HEADER))
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
