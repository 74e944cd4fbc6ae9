"""The sandbox as a pure request handler: Graph, the token endpoint and the `/_sandbox` controls.

No HTTP here: `SandboxApp.handle` takes a method, target, headers and body and returns a
`SandboxResponse`, so tests can call it directly and any transport can mount it. One lock
guards all state; sleeps (latency, injected delays) happen outside it.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

from sandbox.authorize import authorize
from sandbox.config import SandboxConfig
from sandbox.directory import Directory
from sandbox.faults import FaultBook, FaultRule
from sandbox.graph import (
    MAX_BATCH_REQUESTS,
    GraphRequest,
    GraphResources,
    Route,
    cost_of,
    resolve,
)
from sandbox.group_writes import GroupWrites, written_groups
from sandbox.odata import parse_query, path_segments
from sandbox.responses import GraphAnswer, GraphError, SandboxResponse
from sandbox.stats import RouteKind, Stats
from sandbox.throttle import MAX_REPORTED_RATIO, WARNING_RATIO, Throttle, Verdict
from sandbox.tokens import IssuedToken, TokenIssuer, normalize_scope

GRAPH_PREFIX = "/v1.0"
CONTROL_PREFIX = "/_sandbox"
BATCH_SEGMENTS = ["$batch"]
_TOKEN_PATH = re.compile(r"^/([^/]+)/oauth2/v2\.0/token$")
_AUTHORIZE_PATH = re.compile(r"^/([^/]+)/oauth2/v2\.0/authorize$")
# `/me` is the signed-in user of a delegated token.
ME_SEGMENT = "me"
_CONTROL_MEMBERS_PATH = re.compile(r"^/groups/([^/]+)/members$")
# What a group answers a write past `max_group_writes_in_flight`.
BUSY_GROUP_MESSAGE = "The service is temporarily unavailable: too many writes to this group."
# Graph's challenge on a 401, naming the identity platform and Graph's own app id.
WWW_AUTHENTICATE = (
    'Bearer realm="", '
    'authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", '
    'client_id="00000003-0000-0000-c000-000000000000"'
)


class SandboxApp:
    """Microsoft Graph v1.0 and the identity platform's token endpoint, in memory."""

    def __init__(
        self,
        config: SandboxConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._initial_config = config or SandboxConfig()
        self._clock = clock
        self._sleep = sleep
        # Draws each Graph request's latency; a test passes a seeded one.
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self.config = dataclasses.replace(self._initial_config)
        self.directory = Directory.seeded(self.config.bulk_users)
        self._stats = Stats()
        self._faults = FaultBook()
        self._throttle = Throttle(lambda: self.config)
        self._tokens = TokenIssuer(lambda: self.config, clock)
        self._group_writes = GroupWrites()

    # --- control, as Python methods (the `/_sandbox` endpoints call these) ---

    def reset(self) -> None:
        """Back to the seed: directory, config, stats, faults and budgets; tokens stay valid."""
        with self._lock:
            self.config = dataclasses.replace(self._initial_config)
            self.directory = Directory.seeded(self.config.bulk_users)
            self._stats = Stats()
            self._faults.clear()
            self._throttle = Throttle(lambda: self.config)

    def configure(self, **changes: Any) -> SandboxConfig:
        """Change run-time settings (budgets, latency, token lifetime); returns the new config."""
        with self._lock:
            self.config = self.config.updated(changes)
            return self.config

    def add_fault(self, path_regex: str, **spec: Any) -> FaultRule:
        """Add a fault rule; `spec` holds the other fields of `FaultRule` (status, count...)."""
        with self._lock:
            rule = FaultRule.from_json({"path_regex": path_regex, **spec}, self._clock())
            self._faults.add(rule)
            return rule

    def clear_faults(self) -> int:
        """Remove every fault rule; returns how many there were."""
        with self._lock:
            count = len(self._faults.rules)
            self._faults.clear()
            return count

    def expire_tokens(self) -> int:
        """Expire every access token issued so far; returns how many."""
        with self._lock:
            return self._tokens.expire_all()

    def issue_token(self) -> str:
        """An access token for the configured app, through the real token endpoint."""
        form = urlencode(
            {
                "grant_type": "client_credentials",
                "client_id": self.config.client_id,
                "client_secret": self.config.client_secret,
                "scope": "https://graph.microsoft.com/.default",
            }
        )
        response = self.handle(
            "POST", f"/{self.config.tenant_id}/oauth2/v2.0/token", {}, form.encode()
        )
        token: str = response.json()["access_token"]
        return token

    def set_consented_scopes(self, scopes: Sequence[str] | None) -> None:
        """Grant exactly these Graph permissions at sign-in, whatever is asked; None: as asked."""
        names = None if scopes is None else [normalize_scope(scope) for scope in scopes]
        if names is not None and None in names:
            raise ValueError(f"unknown scope in {list(scopes or [])}")
        with self._lock:
            self._tokens.consented_scopes = None if names is None else tuple(filter(None, names))

    def revoke_refresh_tokens(self, account_upn: str) -> int:
        """Revoke the account's refresh tokens, as a password reset does; returns how many."""
        with self._lock:
            return self._tokens.revoke_refresh_tokens(account_upn)

    def expire_refresh_tokens(self) -> int:
        """Expire every active refresh token now; returns how many."""
        with self._lock:
            return self._tokens.expire_refresh_tokens()

    def oauth_stats(self) -> dict[str, Any]:
        """Codes issued and redeemed, refreshes done, refresh tokens active, consented scopes."""
        with self._lock:
            return self._tokens.oauth_stats()

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters, as `GET /_sandbox/stats` answers them."""
        with self._lock:
            return self._stats.as_json()

    # --- requests ---

    def handle(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes = b""
    ) -> SandboxResponse:
        """Answer one HTTP request; `target` is the path with its query string."""
        method = method.upper()
        path, _, query = target.partition("?")
        lowered = {name.lower(): value for name, value in headers.items()}
        if path == GRAPH_PREFIX or path.startswith(GRAPH_PREFIX + "/"):
            return self._graph(method, path, query, lowered, body)
        if path.startswith(CONTROL_PREFIX + "/"):
            return self._control(method, path[len(CONTROL_PREFIX) :], body)
        token_path = _TOKEN_PATH.match(path)
        if token_path is not None and method == "POST":
            return self._token(path, token_path.group(1), lowered, body)
        authorize_path = _AUTHORIZE_PATH.match(path)
        if authorize_path is not None and method == "GET":
            with self._lock:
                return authorize(
                    self._tokens, self.config, self.directory, authorize_path.group(1), query
                )
        return SandboxResponse.of_json(404, {"error": f"no such endpoint: {method} {path}"})

    def _token(
        self, path: str, tenant: str, headers: Mapping[str, str], body: bytes
    ) -> SandboxResponse:
        with self._lock:
            self._stats.count_request("POST", RouteKind.TOKEN)
            rule = self._faults.match("POST", path, self._clock())
            if rule is None or rule.status is None:
                response = self._tokens.token_request(tenant, headers, body)
            else:
                self._stats.fault_hits += 1
                response = rule.answer().response()
            self._stats.responses[response.status] += 1
        if rule is not None and rule.delay_s:
            self._sleep(rule.delay_s)
        return response

    def _graph(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> SandboxResponse:
        request_id = str(uuid.uuid4())
        client_request_id = headers.get("client-request-id") or request_id
        base_url = f"http://{headers['host']}" if "host" in headers else self.config.public_url
        segments = path_segments(path[len(GRAPH_PREFIX) :])
        batch = method == "POST" and segments == BATCH_SEGMENTS
        groups = written_groups(method, segments, body, batch=batch)
        if not self._group_writes.enter(groups, self.config.max_group_writes_in_flight):
            with self._lock:
                self._stats.busy_group_refusals += 1
                self._stats.responses[503] += 1
            self._sleep(self.config.sampled_latency_s(self._rng))
            answer = GraphError(503, "serviceNotAvailable", BUSY_GROUP_MESSAGE).answer()
            return answer.stamped(request_id, client_request_id).response()
        try:
            if batch:
                answer, delay_s = self._batch(path, headers, body, base_url, client_request_id)
            else:
                request = GraphRequest(method, segments, parse_query(query), body, base_url)
                answer, delay_s, _ = self._graph_part(request, path, headers, client_request_id)
            delay_s += self.config.sampled_latency_s(self._rng)
            if delay_s > 0:
                self._sleep(delay_s)
        finally:
            self._group_writes.leave(groups)
        return answer.stamped(request_id, client_request_id).response()

    def _authenticate(self, headers: Mapping[str, str]) -> IssuedToken | GraphAnswer:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        token = token.strip()
        issued = self._tokens.check(token) if scheme.lower() == "bearer" and token else None
        if issued is not None:
            return issued
        if not token or scheme.lower() != "bearer":
            message = "Access token is empty."
        elif self._tokens.is_known(token):
            message = "Access token has expired or is not yet valid."
        else:
            message = "Access token validation failure."
        answer = GraphError(401, "InvalidAuthenticationToken", message).answer()
        answer.headers["WWW-Authenticate"] = WWW_AUTHENTICATE
        return answer

    def _graph_part(
        self,
        request: GraphRequest,
        path: str,
        headers: Mapping[str, str],
        request_key: str,
        count_early: bool = True,
    ) -> tuple[GraphAnswer, float, bool]:
        """Authenticate, charge, fault and perform one Graph request (or `$batch` part).

        `request_key` names the request across its retries (its `client-request-id`).

        Returns the answer, the delay to add before answering, and whether it was an early retry.
        """
        route: Route | GraphAnswer
        try:
            if request.segments[:1] == [ME_SEGMENT]:
                request = self._as_signed_in_user(request, headers)
            route = resolve(request.method, request.segments)
            kind = route.kind
        except GraphError as exc:
            route, kind = exc.answer(), RouteKind.UNKNOWN
        with self._lock:
            now = self._clock()
            self._stats.count_request(request.method, kind)
            issued = self._authenticate(headers)
            if isinstance(issued, GraphAnswer):
                self._stats.responses[issued.status] += 1
                return issued, 0.0, False
            if not self._tokens.permits(issued, kind):
                answer = GraphError(
                    403,
                    "Authorization_RequestDenied",
                    "Insufficient privileges to complete the operation.",
                ).answer()
                self._stats.responses[answer.status] += 1
                return answer, 0.0, False
            cost = cost_of(kind, request, self.config)
            verdict = self._throttle.admit(
                issued.client_id, issued.tenant_id, cost, now, request_key
            )
            self._stats.ru_charged += verdict.ru_charged
            self._stats.early_retries += verdict.early_retry and count_early
            rule = None
            if not verdict.allowed:
                self._stats.throttled += 1
                answer = _throttled(verdict)
            else:
                rule = self._faults.match(request.method, path, now)
                answer = self._perform(route, request, rule)
                if rule is not None:
                    self._record_fault(rule, issued, now, request_key)
            answer.headers["x-ms-resource-unit"] = str(verdict.ru_charged)
            if verdict.usage_ratio > WARNING_RATIO:
                ratio = min(verdict.usage_ratio, MAX_REPORTED_RATIO)
                answer.headers["x-ms-throttle-limit-percentage"] = f"{ratio:.2f}"
            self._stats.responses[answer.status] += 1
        return answer, rule.delay_s if rule is not None else 0.0, verdict.early_retry

    def _as_signed_in_user(self, request: GraphRequest, headers: Mapping[str, str]) -> GraphRequest:
        """`/me...` as `/users/{upn}...` for a delegated token."""
        with self._lock:
            issued = self._authenticate(headers)
            user = None
            if not isinstance(issued, GraphAnswer) and issued.account_upn is not None:
                user = self.directory.user(issued.account_upn)
        if isinstance(issued, GraphAnswer):
            return request  # refused as unauthenticated before the route matters
        if issued.account_upn is None:
            raise GraphError(
                400, "BadRequest", "/me request is only valid with delegated authentication flow."
            )
        # By object id: a UPN such as `$svc@...` is not addressable as a plain segment.
        key = user["id"] if user is not None else issued.account_upn
        segments = ["users", key, *request.segments[1:]]
        return dataclasses.replace(request, segments=segments)

    def _perform(
        self, route: Route | GraphAnswer, request: GraphRequest, rule: FaultRule | None
    ) -> GraphAnswer:
        """The route's answer, or the fault's (after performing the route if `apply_first`)."""
        if rule is not None and rule.status is not None:
            if rule.apply_first and isinstance(route, Route):
                # An ambiguous write: the change is made, the client hears it failed.
                self._resources().answer(route, request)
            return rule.answer()
        if isinstance(route, GraphAnswer):
            return route
        return self._resources().answer(route, request)

    def _resources(self) -> GraphResources:
        return GraphResources(self.directory, self.config, self._stats)

    def _record_fault(
        self, rule: FaultRule, issued: IssuedToken, now: float, request_key: str
    ) -> None:
        self._stats.fault_hits += 1
        wait_s = rule.retry_after_s()
        if rule.status == 429 and wait_s is not None:
            # An injected 429 tells the app to wait like a real one: arriving earlier is early.
            self._throttle.told_to_wait(
                issued.client_id, issued.tenant_id, now, now + wait_s, request_key
            )

    def _batch(
        self,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        base_url: str,
        client_request_id: str,
    ) -> tuple[GraphAnswer, float]:
        """POST /$batch: every part authenticated, charged, throttled and faulted on its own."""
        with self._lock:
            self._stats.count_request("POST", RouteKind.BATCH)
            issued = self._authenticate(headers)
            if isinstance(issued, GraphAnswer):
                self._stats.responses[issued.status] += 1
                return issued, 0.0
            rule = self._faults.match("POST", path, self._clock())
            if rule is not None and rule.status is not None:
                self._record_fault(rule, issued, self._clock(), client_request_id)
                self._stats.responses[rule.status] += 1
                return rule.answer(), rule.delay_s
        try:
            parts = _batch_parts(body)
        except GraphError as exc:
            with self._lock:
                self._stats.responses[exc.status] += 1
            return exc.answer(), 0.0
        responses = []
        delay_s = rule.delay_s if rule is not None else 0.0
        ru_total, ratio_header = 0, None
        # Parts after a 429 in this same batch were sent before the client could know.
        told_in_this_batch = False
        for part in parts:
            part_path, _, part_query = str(part["url"]).lstrip("/").partition("?")
            request = GraphRequest(
                str(part["method"]).upper(),
                path_segments(part_path),
                parse_query(part_query),
                b"" if part.get("body") is None else json.dumps(part["body"]).encode(),
                base_url,
            )
            part_headers = {str(k).lower(): str(v) for k, v in (part.get("headers") or {}).items()}
            part_headers["authorization"] = headers.get("authorization", "")
            answer, part_delay_s, early = self._graph_part(
                request,
                f"{GRAPH_PREFIX}/{part_path}",
                part_headers,
                f"{client_request_id}/{part['id']}",
                not told_in_this_batch,
            )
            told_in_this_batch = told_in_this_batch or (answer.status == 429 and not early)
            delay_s += part_delay_s
            ru_total += int(answer.headers.get("x-ms-resource-unit", "0"))
            ratio_header = answer.headers.get("x-ms-throttle-limit-percentage", ratio_header)
            stamped = answer.stamped(str(uuid.uuid4()), client_request_id)
            entry: dict[str, Any] = {
                "id": part["id"],
                "status": stamped.status,
                "headers": stamped.headers,
            }
            if stamped.body is not None:
                entry["body"] = stamped.body
                entry["headers"]["Content-Type"] = "application/json"
            responses.append(entry)
        # The envelope costs nothing itself; it reports the total of its parts.
        outer_headers = {"x-ms-resource-unit": str(ru_total)}
        if ratio_header is not None:
            outer_headers["x-ms-throttle-limit-percentage"] = ratio_header
        with self._lock:
            self._stats.responses[200] += 1
        return GraphAnswer(200, {"responses": responses}, outer_headers), delay_s

    # --- the /_sandbox control endpoints ---

    def _control(self, method: str, path: str, body: bytes) -> SandboxResponse:
        try:
            return self._control_route(method, path, _json_object(body))
        except (ValueError, TypeError) as exc:
            return SandboxResponse.of_json(400, {"error": str(exc)})

    def _control_route(self, method: str, path: str, body: dict[str, Any]) -> SandboxResponse:
        match method, path:
            case "GET", "/health":
                return SandboxResponse.of_json(200, {"status": "ok"})
            case "GET", "/stats":
                return SandboxResponse.of_json(200, self.stats())
            case "POST", "/reset":
                self.reset()
                return SandboxResponse.of_json(200, {"status": "reset"})
            case "GET", "/config":
                return SandboxResponse.of_json(200, dataclasses.asdict(self.config))
            case "POST", "/config":
                return SandboxResponse.of_json(200, dataclasses.asdict(self.configure(**body)))
            case "GET", "/faults":
                with self._lock:
                    rules = [rule.as_json() for rule in self._faults.rules]
                return SandboxResponse.of_json(200, {"faults": rules})
            case "POST", "/faults":
                with self._lock:
                    rule = FaultRule.from_json(body, self._clock())
                    self._faults.add(rule)
                return SandboxResponse.of_json(201, rule.as_json())
            case "DELETE", "/faults":
                return SandboxResponse.of_json(200, {"cleared": self.clear_faults()})
            case "POST", "/tokens/expire":
                return SandboxResponse.of_json(200, {"expired": self.expire_tokens()})
            case "GET", "/oauth":
                return SandboxResponse.of_json(200, self.oauth_stats())
            case "POST", "/oauth/consent":
                self.set_consented_scopes(body.get("scopes"))
                return SandboxResponse.of_json(200, self.oauth_stats())
            case "POST", "/oauth/revoke":
                if not isinstance(body.get("upn"), str):
                    raise ValueError('give the account as {"upn": "..."}')
                revoked = self.revoke_refresh_tokens(body["upn"])
                return SandboxResponse.of_json(200, {"revoked": revoked})
            case "POST", "/oauth/expire-refresh-tokens":
                return SandboxResponse.of_json(200, {"expired": self.expire_refresh_tokens()})
            case "GET", _ if (members := _CONTROL_MEMBERS_PATH.match(path)) is not None:
                with self._lock:
                    member_ids = self.directory.members(members.group(1))
                return SandboxResponse.of_json(200, {"members": member_ids})
        return SandboxResponse.of_json(404, {"error": f"no such control: {method} {path}"})


def _throttled(verdict: Verdict) -> GraphAnswer:
    assert verdict.reason is not None
    return GraphAnswer(
        429,
        {"error": {"code": "TooManyRequests", "message": "Too many requests."}},
        {
            "Retry-After": str(verdict.retry_after_s),
            "x-ms-throttle-scope": verdict.scope,
            "x-ms-throttle-information": verdict.reason.value,
        },
    )


def _batch_parts(body: bytes) -> list[dict[str, Any]]:
    """The parts of a `$batch` body, checked as Graph checks them before running any."""
    try:
        payload = json.loads(body or b"null")
    except ValueError as exc:
        raise GraphError(400, "BadRequest", "Invalid batch payload format.") from exc
    parts = payload.get("requests") if isinstance(payload, dict) else None
    if not isinstance(parts, list) or not parts:
        raise GraphError(400, "BadRequest", "Invalid batch payload format.")
    if len(parts) > MAX_BATCH_REQUESTS:
        raise GraphError(
            400,
            "BadRequest",
            f"Limit exceeded: a batch may hold at most {MAX_BATCH_REQUESTS} requests.",
        )
    seen: set[str] = set()
    for part in parts:
        if not isinstance(part, dict) or not all(part.get(k) for k in ("id", "method", "url")):
            raise GraphError(400, "BadRequest", "Invalid batch payload format.")
        if str(part["id"]) in seen:
            raise GraphError(400, "BadRequest", f"Request id '{part['id']}' is not unique.")
        seen.add(str(part["id"]))
        if str(part["url"]).lower().startswith(("http:", "https:")):
            raise GraphError(400, "BadRequest", "Batch request URLs must be relative.")
        content_types = {str(k).lower() for k in (part.get("headers") or {})}
        if part.get("body") is not None and "content-type" not in content_types:
            raise GraphError(
                400,
                "BadRequest",
                f"Write request id : {part['id']} does not contain Content-Type header or body.",
            )
    return parts


def _json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    value = json.loads(body)
    if not isinstance(value, dict):
        raise ValueError("the body must be a JSON object")
    return value
