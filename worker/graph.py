"""The Graph client: one `requests` session, bearer tokens, error mapping and retries.

One client is meant to be shared by every thread of a process: it keeps no per-request state.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import redis
import requests
from requests.adapters import HTTPAdapter

from entraflow import metrics
from entraflow.settings import DEFAULT_HTTP_TIMEOUT_S, Settings
from worker.addressing import check_next_link
from worker.budget import Budget, Priority, budget_hooks
from worker.errors import (
    REQUEST_ID_HEADER,
    GraphConnectionError,
    PermanentGraphError,
    error_from_answer,
)
from worker.group_writes import GroupWriteSlots, written_groups
from worker.retry import RetryPolicy
from worker.tokens import (
    SessionFactory,
    TokenProvider,
    connection_identity,
    new_oauth2_session,
    token_provider_for,
)

JSON_MEDIA_TYPE = "application/json"
CLIENT_REQUEST_ID_HEADER = "client-request-id"
# The official SDKs number each retry in this request header (GRAPH.md, "Throttling").
RETRY_ATTEMPT_HEADER = "Retry-Attempt"
NEXT_LINK_KEY = "@odata.nextLink"
# Connections kept open to the Graph host, across the threads of a worker: one per request in
# flight (requests keeps 10 by default, and opens then drops a new one for every request past).
KEPT_CONNECTIONS = 128
# A request refused with 401 is sent again with a new token at most this many times.
MAX_TOKEN_RENEWALS = 2
# A write slot of a group is leased for the longest a request may hold it: its wait for the
# budget, its HTTP timeout, and this margin.
WRITE_SLOT_LEASE_MARGIN_S = 5.0
# Redirects are refused rather than followed: our bearer token goes to the Graph host only.
FIRST_NON_SUCCESS_STATUS = 300

# requests' ways of saying Graph gave no (complete) answer; worth another try.
NO_ANSWER_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
)

# Called before every HTTP send with the method and the path below the Graph URL (or the
# absolute URL of a next link), and after every answer, errors included: a shared rate
# limiter plugs in here.
BeforeRequest = Callable[[str, str], None]
AfterResponse = Callable[[requests.Response], None]


@dataclass(frozen=True)
class GraphResponse:
    """A successful Graph answer."""

    status: int
    data: Any
    headers: Mapping[str, str]
    request_id: str | None


class GraphClient:
    """Sends requests to Graph with a bearer token, retrying transient failures."""

    def __init__(
        self,
        graph_url: str,
        token_provider: TokenProvider,
        *,
        session: requests.Session | None = None,
        retry_policy: RetryPolicy | None = None,
        timeout_s: float = DEFAULT_HTTP_TIMEOUT_S,
        before_request: BeforeRequest | None = None,
        after_response: AfterResponse | None = None,
        write_slots: GroupWriteSlots | None = None,
    ) -> None:
        self.graph_url = graph_url.rstrip("/")
        self._token_provider = token_provider
        self._session = session or pooled_session(self.graph_url)
        self._retry_policy = retry_policy or RetryPolicy()
        self._timeout_s = timeout_s
        self._before_request = before_request
        self._after_response = after_response
        self._write_slots = write_slots

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        session: requests.Session | None = None,
        token_session_factory: SessionFactory = new_oauth2_session,
        budget_redis: redis.Redis | None = None,
        priority: Priority = Priority.NORMAL,
    ) -> GraphClient:
        """The client for the Graph `settings` name, as the stored connection or else the app.

        With `budget_redis`, every request first takes from the Graph budget that all workers
        of this app and tenant share there (see worker.budget), and a write to a group a slot
        of the group's (see worker.group_writes).
        """
        before_request = after_response = None
        write_slots = None
        if budget_redis is not None:
            app_id, tenant_id = connection_identity(settings)
            budget = Budget.from_settings(
                budget_redis, settings, app_id=app_id, tenant_id=tenant_id
            )
            before_request, after_response = budget_hooks(budget, priority)
            if settings.max_writes_per_group:
                write_slots = GroupWriteSlots(
                    budget_redis,
                    budget.app_id,
                    budget.tenant_id,
                    per_group=settings.max_writes_per_group,
                    lease_s=settings.max_inprocess_wait_s
                    + settings.http_timeout_s
                    + WRITE_SLOT_LEASE_MARGIN_S,
                    max_wait_s=settings.max_inprocess_wait_s,
                )
        return cls(
            settings.graph_url,
            token_provider_for(settings, token_session_factory=token_session_factory),
            session=session,
            retry_policy=RetryPolicy(
                max_attempts=settings.max_graph_attempts,
                max_total_s=settings.max_graph_retry_time_s,
                max_inprocess_wait_s=settings.max_inprocess_wait_s,
            ),
            timeout_s=settings.http_timeout_s,
            before_request=before_request,
            after_response=metrics.counting_responses(after_response),
            write_slots=write_slots,
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> GraphResponse:
        """Send `method path?params`; `path` and the `params` values come encoded from addressing.

        The URL is built here, not by `requests`, which would encode `$select` as `%24select`.
        """
        url = self.graph_url + path
        if params:
            url += "?" + "&".join(f"{name}={value}" for name, value in params.items())
        return self._request_url(method, url, json=json, headers=headers)

    def get_all(
        self, path: str, params: Mapping[str, str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Every item of a collection, following `@odata.nextLink` on the Graph host only."""
        response = self.request("GET", path, params=params)
        while True:
            data = response.data if isinstance(response.data, dict) else {}
            yield from data.get("value", [])
            next_link = data.get(NEXT_LINK_KEY)
            if not next_link:
                return
            response = self._request_url("GET", check_next_link(str(next_link), self.graph_url))

    def _request_url(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> GraphResponse:
        # One id for the logical request, the same on every retry, so Graph's logs tie them up.
        client_request_id = str(uuid.uuid4())
        return self._retry_policy.call(
            lambda retry_number: self._attempt(
                method, url, json, headers or {}, client_request_id, retry_number
            )
        )

    def _attempt(
        self,
        method: str,
        url: str,
        json: Any,
        headers: Mapping[str, str],
        client_request_id: str,
        retry_number: int,
    ) -> GraphResponse:
        request_headers = {
            "Accept": JSON_MEDIA_TYPE,
            CLIENT_REQUEST_ID_HEADER: client_request_id,
            **headers,
        }
        if retry_number:
            request_headers[RETRY_ATTEMPT_HEADER] = str(retry_number)
        token = self._token_provider.token()
        response = self._send(method, url, json, request_headers, token)
        for _ in range(MAX_TOKEN_RENEWALS):
            if response.status_code != HTTPStatus.UNAUTHORIZED:
                break
            # Tokens can be revoked or rolled before they expire: take a new one. Another
            # thread may have fetched it before the revocation too, so a second refusal takes
            # one more, now surely newer than both.
            token = self._token_provider.token(rejected=token)
            response = self._send(method, url, json, request_headers, token)
        if response.status_code >= FIRST_NON_SUCCESS_STATUS:
            raise error_from_answer(
                response.status_code, response.headers, response.content, response.reason
            )
        return GraphResponse(
            status=response.status_code,
            data=_json_or_none(response),
            headers=response.headers,
            request_id=response.headers.get(REQUEST_ID_HEADER),
        )

    def _send(
        self, method: str, url: str, json: Any, headers: Mapping[str, str], token: str
    ) -> requests.Response:
        target = url.removeprefix(self.graph_url)
        with self._holding_write_slots(method, target, json):
            if self._before_request:
                self._before_request(method, target)
            try:
                response = self._session.request(
                    method,
                    url,
                    json=json,
                    headers={**headers, "Authorization": f"Bearer {token}"},
                    timeout=self._timeout_s,
                    allow_redirects=False,
                )
            except NO_ANSWER_ERRORS as exc:
                raise GraphConnectionError(
                    f"{method} {target} got no answer ({type(exc).__name__})"
                ) from exc
            except requests.RequestException as exc:
                raise PermanentGraphError(
                    f"{method} {target} could not be sent ({type(exc).__name__})"
                ) from exc
            if self._after_response:
                self._after_response(response)
        return response

    def _holding_write_slots(
        self, method: str, target: str, json: Any
    ) -> AbstractContextManager[None]:
        """A slot of each group the request writes to, held while it is sent and answered."""
        if self._write_slots is None:
            return nullcontext()
        return self._write_slots.holding(written_groups(method, target, json))


def pooled_session(graph_url: str) -> requests.Session:
    """A `requests` session for Graph that keeps a connection open for each of many threads.

    The proxy for Graph and the CA bundle are read from the environment here, once, as
    `requests` would read them for every request (iterating the whole environment each time):
    the session sends to Graph only.
    """
    session = requests.Session()
    session.proxies = requests.utils.get_environ_proxies(graph_url)
    ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if ca_bundle:
        session.verify = ca_bundle
    session.trust_env = False
    adapter = HTTPAdapter(pool_maxsize=KEPT_CONNECTIONS)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def _json_or_none(response: requests.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return None
