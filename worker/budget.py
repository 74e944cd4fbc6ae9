"""One Graph budget per app and tenant, shared by every worker process through Redis.

Graph throttles identity requests with two rolling windows per app and tenant, resource units
and writes (GRAPH.md, "Throttling"). Before a request is sent its estimated cost is taken from
the shared budget (`Budget.acquire`, which waits while the budget is spent); the answer then
corrects the estimate with `x-ms-resource-unit`, pauses every worker after a 429 for the scope
`x-ms-throttle-scope` names, and slows every worker down when `x-ms-throttle-limit-percentage`
shows Graph counting usage we did not send. `budget_hooks` plugs all of it into a `GraphClient`.

Each window is a Redis sorted set with one member per unit spent, scored by when: the rolling
window Graph keeps, so usage is exact and the wait for a unit is the age of the unit in the way.
Every step that reads and then writes is one Lua script, atomic across processes.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
import requests

from entraflow import keys
from entraflow.settings import (
    DEFAULT_LOW_PRIORITY_BUDGET_SHARE,
    DEFAULT_MAX_INPROCESS_WAIT_S,
    DEFAULT_PATCH_WRITE_COST,
    DEFAULT_RU_PER_WINDOW,
    DEFAULT_RU_WINDOW_S,
    DEFAULT_WRITE_WINDOW_S,
    DEFAULT_WRITES_PER_WINDOW,
    PatchWriteCost,
    Settings,
)
from worker.errors import SharedLimitError, retry_after_s_of

PRIORITY_HEADER = "x-ms-throttle-priority"
RESOURCE_UNIT_HEADER = "x-ms-resource-unit"
LIMIT_PERCENTAGE_HEADER = "x-ms-throttle-limit-percentage"
THROTTLE_SCOPE_HEADER = "x-ms-throttle-scope"
BATCH_PATH = "/$batch"
MEMBERS_BIND_KEY = "members@odata.bind"
# Graph's caps on members bound in one PATCH and on parts in one `$batch`.
MAX_MEMBERS_PER_PATCH = 20
MAX_BATCH_REQUESTS = 20

# Costs in resource units (GRAPH.md): a users collection, a member list, anything else.
USERS_COLLECTION_RU = 2
GROUP_MEMBERS_RU = 3
OTHER_READ_RU = 1
WRITE_RU = 1
# `$top` below this saves one RU; no request costs less than MIN_RU.
SMALL_TOP = 20
MIN_RU = 1

# Graph reports `x-ms-throttle-limit-percentage` only above this share of a budget.
SLOWDOWN_START_RATIO = 0.8
# Usage Graph reports beyond our own count, as a share of the budget, that we ignore: in-flight
# requests and clocks make the two differ a little all the time.
UNSEEN_USAGE_TOLERANCE = 0.05
# However much usage others cause, we keep at least this share of the budget.
MIN_RATE_FACTOR = 0.1
# A slowdown lasts this long unless a newer answer renews or lifts it.
SLOWDOWN_HOLD_S = 10.0
# Units stay in our windows this much longer than in Graph's: a request leaves here before it
# reaches Graph, so a unit expiring here at the same moment could still be counted there.
WINDOW_MARGIN_S = 0.2
# Waiting workers look at the budget again at least this often: a pause or a refund can end a
# wait early.
MAX_SLEEP_STEP_S = 0.25
# How long a 429 without `Retry-After` pauses everyone: the SDKs' first backoff plus its jitter.
PAUSE_WITHOUT_RETRY_AFTER_S = 1.5

RU_BUDGET = "ru"
WRITES_BUDGET = "writes"
READ_KIND = "read"
WRITE_KIND = "write"
# Graph's throttle scope is `level/kinds/app/tenant`; these levels and kinds are the ones we
# tell apart, anything else pauses reads and writes of this app and tenant.
APPLICATION_SCOPE = "Application"
SCOPE_KINDS = {"Read": (READ_KIND,), "Write": (WRITE_KIND,)}
ALL_KINDS = (READ_KIND, WRITE_KIND)

_SERVER_NOW = """
local function now_s(arg)
  local given = tonumber(arg)
  if given then return given end
  local time = redis.call('TIME')
  return tonumber(time[1]) + tonumber(time[2]) / 1000000
end
"""

# KEYS: ru log, writes log, slowdown, then the pause keys this request honours.
# ARGV: now ('' for the server's), token, ru, writes, ru limit, ru window s, write limit,
#       write window s, share. Returns '0' with the units taken, or the seconds to wait.
_ACQUIRE = (
    _SERVER_NOW
    + """
local now = now_s(ARGV[1])
local wait = 0
for i = 4, #KEYS do
  local paused_until = tonumber(redis.call('GET', KEYS[i]))
  if paused_until and paused_until - now > wait then wait = paused_until - now end
end
if wait > 0 then return tostring(wait) end
local share = tonumber(ARGV[9]) * (tonumber(redis.call('GET', KEYS[3])) or 1)
local budgets = {
  {KEYS[1], tonumber(ARGV[3]), tonumber(ARGV[5]), tonumber(ARGV[6])},
  {KEYS[2], tonumber(ARGV[4]), tonumber(ARGV[7]), tonumber(ARGV[8])},
}
for _, b in ipairs(budgets) do
  local key, amount, limit, window = b[1], b[2], b[3], b[4]
  if amount > 0 then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
    local allowed = math.max(1, math.floor(limit * share))
    -- A request larger than the whole budget goes through an empty window, or it never would.
    local excess = redis.call('ZCARD', key) + math.min(amount, allowed) - allowed
    if excess > 0 then
      local blocking = redis.call('ZRANGE', key, excess - 1, excess - 1, 'WITHSCORES')
      local until_free = tonumber(blocking[2]) + window - now
      if until_free > wait then wait = until_free end
    end
  end
end
if wait > 0 then return tostring(wait) end
for _, b in ipairs(budgets) do
  for n = 1, b[2] do redis.call('ZADD', b[1], now, ARGV[2] .. ':' .. n) end
  if b[2] > 0 then redis.call('PEXPIRE', b[1], math.ceil(b[4] * 1000)) end
end
return '0'
"""
)

# KEYS: ru log, writes log, slowdown. ARGV: now, reported ratio, ru limit, ru window s,
# write limit, write window s, tolerance, minimum factor, hold ms.
_OBSERVE = (
    _SERVER_NOW
    + """
local now = now_s(ARGV[1])
local own = math.max(
  redis.call('ZCOUNT', KEYS[1], '(' .. (now - tonumber(ARGV[4])), '+inf') / tonumber(ARGV[3]),
  redis.call('ZCOUNT', KEYS[2], '(' .. (now - tonumber(ARGV[6])), '+inf') / tonumber(ARGV[5]))
local unseen = tonumber(ARGV[2]) - own
if unseen > tonumber(ARGV[7]) then
  local factor = math.max(tonumber(ARGV[8]), 1 - unseen)
  redis.call('SET', KEYS[3], tostring(factor), 'PX', ARGV[9])
else
  redis.call('DEL', KEYS[3])
end
return tostring(own)
"""
)

# KEYS: the pause keys to set. ARGV: now, seconds to pause. Never shortens a longer pause.
_PAUSE = (
    _SERVER_NOW
    + """
local now = now_s(ARGV[1])
local wait = tonumber(ARGV[2])
for _, key in ipairs(KEYS) do
  local current = tonumber(redis.call('GET', key))
  if not current or current < now + wait then
    redis.call('SET', key, tostring(now + wait), 'PX', math.ceil(wait * 1000) + 1)
  end
end
return 1
"""
)


class Priority(StrEnum):
    """Which requests go first when the budget runs short; the values are Graph's header values."""

    LOW = "Low"
    NORMAL = "Normal"
    HIGH = "High"


class BudgetExhaustedError(SharedLimitError):
    """Raised when the shared Graph budget needs a longer wait than a worker should sleep."""

    summary = "the shared Graph budget is spent"


@dataclass(frozen=True)
class Cost:
    """What one request takes from the budget: resource units and writes."""

    ru: int
    writes: int = 0


@dataclass(frozen=True)
class Grant:
    """Units taken from the budget for one request, to settle once Graph has answered."""

    token: str
    cost: Cost


def estimate_cost(
    method: str, target: str, patch_write_cost: PatchWriteCost = DEFAULT_PATCH_WRITE_COST
) -> Cost:
    """What a request to `target` (path below the Graph URL, or a next link) will cost at most.

    The body is not known here, so a `$batch` counts as full and a members PATCH, when Graph
    charges per member, as binding the most members it may; the answer settles the difference.
    """
    parts = urlsplit(target)
    segments = [segment for segment in parts.path.split("/") if segment]
    if method != "GET":
        if parts.path.endswith(BATCH_PATH):
            return Cost(MAX_BATCH_REQUESTS * WRITE_RU, MAX_BATCH_REQUESTS)
        if method == "PATCH" and patch_write_cost is PatchWriteCost.MEMBER:
            return Cost(WRITE_RU, MAX_MEMBERS_PER_PATCH)
        return Cost(WRITE_RU, 1)
    query = parse_qs(parts.query)
    if segments[-1:] == ["users"]:
        ru = USERS_COLLECTION_RU
    elif segments[-3:-2] == ["groups"] and segments[-1:] == ["members"]:
        ru = GROUP_MEMBERS_RU
    else:
        ru = OTHER_READ_RU
    ru += ("$expand" in query) - ("$select" in query)
    top = query.get("$top", [""])[0]
    if top.isdigit() and int(top) < SMALL_TOP:
        ru -= 1
    return Cost(max(MIN_RU, ru))


class Budget:
    """The resource-unit and write budgets of one app in one tenant, shared through Redis."""

    def __init__(
        self,
        redis_client: redis.Redis,
        app_id: str,
        tenant_id: str,
        *,
        ru_per_window: int = DEFAULT_RU_PER_WINDOW,
        ru_window_s: float = DEFAULT_RU_WINDOW_S,
        writes_per_window: int = DEFAULT_WRITES_PER_WINDOW,
        write_window_s: float = DEFAULT_WRITE_WINDOW_S,
        patch_write_cost: PatchWriteCost = DEFAULT_PATCH_WRITE_COST,
        low_priority_share: float = DEFAULT_LOW_PRIORITY_BUDGET_SHARE,
        max_wait_s: float = DEFAULT_MAX_INPROCESS_WAIT_S,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`clock` None reads the Redis server's clock, the one every worker agrees on."""
        self.app_id = app_id
        self.tenant_id = tenant_id
        self.ru_per_window = ru_per_window
        self.ru_window_s = ru_window_s
        self.writes_per_window = writes_per_window
        self.write_window_s = write_window_s
        self.patch_write_cost = patch_write_cost
        self.low_priority_share = low_priority_share
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._sleep = sleep
        self._redis = redis_client
        self._acquire = redis_client.register_script(_ACQUIRE)
        self._observe = redis_client.register_script(_OBSERVE)
        self._pause = redis_client.register_script(_PAUSE)
        self._ru_log = keys.graph_usage_log(app_id, tenant_id, RU_BUDGET)
        self._writes_log = keys.graph_usage_log(app_id, tenant_id, WRITES_BUDGET)
        self._slowdown = keys.graph_slowdown(app_id, tenant_id)

    @classmethod
    def from_settings(
        cls,
        redis_client: redis.Redis,
        settings: Settings,
        *,
        app_id: str | None = None,
        tenant_id: str | None = None,
    ) -> Budget:
        """The budget of an app and tenant (those of `settings` by default), with its limits."""
        app_id = app_id or settings.client_id
        tenant_id = tenant_id or settings.tenant_id
        if not app_id or not tenant_id:
            raise ValueError("a Graph budget needs ENTRAFLOW_CLIENT_ID and ENTRAFLOW_TENANT_ID")
        return cls(
            redis_client,
            app_id,
            tenant_id,
            ru_per_window=settings.ru_per_window,
            ru_window_s=settings.ru_window_s,
            writes_per_window=settings.writes_per_window,
            write_window_s=settings.write_window_s,
            patch_write_cost=settings.patch_write_cost,
            low_priority_share=settings.low_priority_budget_share,
            max_wait_s=settings.max_inprocess_wait_s,
        )

    def estimate(self, method: str, target: str) -> Cost:
        """What a request will cost at most, under this budget's PATCH rule."""
        return estimate_cost(method, target, self.patch_write_cost)

    def acquire(self, cost: Cost, priority: Priority = Priority.NORMAL) -> Grant:
        """Take `cost` from the budget, sleeping in steps until it fits or a pause is over.

        Raises `BudgetExhaustedError` with `retry_after_s` set when the wait would take the time
        waited past `max_wait_s`: the caller requeues itself with that countdown instead.
        """
        token = uuid.uuid4().hex
        share = self.low_priority_share if priority is Priority.LOW else 1.0
        waited_s = 0.0
        while True:
            wait_s = self._take(cost, share, token)
            if wait_s <= 0:
                return Grant(token, cost)
            if waited_s + wait_s > self.max_wait_s:
                raise BudgetExhaustedError(
                    f"the Graph budget of app {self.app_id} in tenant {self.tenant_id} "
                    f"allows this request in {wait_s:.1f} s",
                    retry_after_s=wait_s,
                )
            step_s = min(wait_s, MAX_SLEEP_STEP_S)
            self._sleep(step_s)
            waited_s += step_s

    def _take(self, cost: Cost, share: float, token: str) -> float:
        """Take `cost` now as `token` and answer 0, or answer how long until it would fit."""
        pause_kinds = ALL_KINDS if cost.writes else (READ_KIND,)
        pauses = [
            keys.graph_pause(self.app_id, tenant, kind)
            for tenant in (self.tenant_id, keys.ALL_TENANTS)
            for kind in pause_kinds
        ]
        answer = self._acquire(
            keys=[self._ru_log, self._writes_log, self._slowdown, *pauses],
            args=[
                self._now(),
                token,
                cost.ru,
                cost.writes,
                self.ru_per_window,
                self.ru_window_s + WINDOW_MARGIN_S,
                self.writes_per_window,
                self.write_window_s + WINDOW_MARGIN_S,
                share,
            ],
        )
        return float(answer)

    def settle(self, grant: Grant, charged: Cost) -> None:
        """Replace what `grant` took with what Graph says it charged."""
        pipeline = self._redis.pipeline(transaction=True)
        for log, granted, actual in (
            (self._ru_log, grant.cost.ru, charged.ru),
            (self._writes_log, grant.cost.writes, charged.writes),
        ):
            if actual < granted:
                pipeline.zrem(log, *(f"{grant.token}:{n}" for n in range(actual + 1, granted + 1)))
            elif actual > granted:
                now = self._clock() if self._clock else self._server_time()
                pipeline.zadd(
                    log, {f"{grant.token}:{n}": now for n in range(granted + 1, actual + 1)}
                )
        pipeline.execute()

    def pause(self, retry_after_s: float, scope: str | None = None) -> None:
        """Make every worker wait `retry_after_s` before sending what Graph's `scope` covers."""
        level, _, rest = (scope or "").partition("/")
        kinds = SCOPE_KINDS.get(rest.partition("/")[0], ALL_KINDS)
        tenant = keys.ALL_TENANTS if level == APPLICATION_SCOPE else self.tenant_id
        self._pause(
            keys=[keys.graph_pause(self.app_id, tenant, kind) for kind in kinds],
            args=[self._now(), retry_after_s],
        )

    def observe_usage(self, reported_ratio: float) -> None:
        """Slow every worker down by the share of the budget Graph counts and we did not send."""
        self._observe(
            keys=[self._ru_log, self._writes_log, self._slowdown],
            args=[
                self._now(),
                reported_ratio,
                self.ru_per_window,
                self.ru_window_s + WINDOW_MARGIN_S,
                self.writes_per_window,
                self.write_window_s + WINDOW_MARGIN_S,
                UNSEEN_USAGE_TOLERANCE,
                MIN_RATE_FACTOR,
                math.ceil(SLOWDOWN_HOLD_S * 1000),
            ],
        )

    def usage(self) -> Cost:
        """Resource units and writes spent in the current windows."""
        now = self._clock() if self._clock else self._server_time()
        pipeline = self._redis.pipeline(transaction=False)
        pipeline.zcount(self._ru_log, f"({now - self.ru_window_s - WINDOW_MARGIN_S}", "+inf")
        pipeline.zcount(self._writes_log, f"({now - self.write_window_s - WINDOW_MARGIN_S}", "+inf")
        ru, writes = pipeline.execute()
        return Cost(int(ru), int(writes))

    def record(self, response: requests.Response, grant: Grant) -> None:
        """Learn from Graph's answer to the request `grant` paid for."""
        self.settle(grant, self._charged(response, grant))
        for retry_after_s, scope in _throttles(response):
            self.pause(retry_after_s, scope)
        ratio = _float_header(response.headers, LIMIT_PERCENTAGE_HEADER)
        if ratio is not None and ratio > SLOWDOWN_START_RATIO:
            self.observe_usage(ratio)

    def _charged(self, response: requests.Response, grant: Grant) -> Cost:
        """What Graph charged: its RU count, and the writes of the parts it did not refuse."""
        ru = _float_header(response.headers, RESOURCE_UNIT_HEADER)
        charged_ru = grant.cost.ru if ru is None else math.ceil(ru)
        request = response.request
        path = urlsplit(request.url or "").path if request is not None else ""
        body = _json(request.body) if request is not None else None
        if path.endswith(BATCH_PATH) and isinstance(body, dict):
            return Cost(charged_ru, self._batch_writes(body, _json(response.content)))
        if ru is not None and charged_ru == 0:
            # Graph refused the request without counting it.
            return Cost(0, 0)
        if (
            grant.cost.writes
            and request is not None
            and request.method == "PATCH"
            and self.patch_write_cost is PatchWriteCost.MEMBER
            and isinstance(body, dict)
        ):
            return Cost(charged_ru, max(1, len(body.get(MEMBERS_BIND_KEY) or [])))
        return Cost(charged_ru, grant.cost.writes)

    def _batch_writes(self, body: dict[str, Any], answer: Any) -> int:
        answers = _batch_answers(answer)
        writes = 0
        for part in body.get("requests") or []:
            method = str(part.get("method", "GET")).upper()
            part_answer = answers.get(str(part.get("id")), {})
            if method == "GET" or _part_refused(part_answer):
                continue
            binds = (part.get("body") or {}).get(MEMBERS_BIND_KEY) if method == "PATCH" else None
            per_member = self.patch_write_cost is PatchWriteCost.MEMBER
            writes += len(binds) if per_member and isinstance(binds, list) and binds else 1
        return writes

    def _now(self) -> str:
        # An empty string makes the scripts read the Redis server's clock.
        return repr(self._clock()) if self._clock else ""

    def _server_time(self) -> float:
        seconds, microseconds = self._redis.time()
        return seconds + microseconds / 1_000_000


def budget_hooks(
    budget: Budget, priority: Priority = Priority.NORMAL
) -> tuple[Callable[[str, str], None], Callable[[requests.Response], None]]:
    """`GraphClient` hooks that pay for every request from `budget` and report every answer.

    A client sending bulk work uses `Priority.LOW` here and sends `x-ms-throttle-priority: Low`.
    """
    # The client calls both hooks of one request in the same thread, one request at a time.
    pending = threading.local()

    def before_request(method: str, target: str) -> None:
        pending.grant = budget.acquire(budget.estimate(method, target), priority)

    def after_response(response: requests.Response) -> None:
        grant = getattr(pending, "grant", None)
        pending.grant = None
        if grant is not None:
            budget.record(response, grant)

    return before_request, after_response


def _throttles(response: requests.Response) -> list[tuple[float, str | None]]:
    """The waits and scopes of a 429, or of every 429 part of a `$batch` answer."""
    if response.status_code == 429:
        return [_throttle(response.headers)]
    request = response.request
    if request is None or not urlsplit(request.url or "").path.endswith(BATCH_PATH):
        return []
    return [
        _throttle(part.get("headers") or {})
        for part in _batch_answers(_json(response.content)).values()
        if part.get("status") == 429
    ]


def _throttle(headers: Mapping[str, str]) -> tuple[float, str | None]:
    retry_after_s = retry_after_s_of(headers)
    if retry_after_s is None:
        retry_after_s = PAUSE_WITHOUT_RETRY_AFTER_S
    lowered = {name.lower(): str(value) for name, value in headers.items()}
    return retry_after_s, lowered.get(THROTTLE_SCOPE_HEADER)


def _batch_answers(answer: Any) -> dict[str, dict[str, Any]]:
    responses = answer.get("responses") if isinstance(answer, dict) else None
    return {str(part.get("id")): part for part in responses or [] if isinstance(part, dict)}


def _part_refused(part: Mapping[str, Any]) -> bool:
    """Whether Graph refused a `$batch` part without counting it (throttled, nothing charged)."""
    headers = {name.lower(): value for name, value in (part.get("headers") or {}).items()}
    charged = headers.get(RESOURCE_UNIT_HEADER)
    if charged is not None:
        return str(charged) == "0"
    return part.get("status") == 429


def _float_header(headers: Mapping[str, str], name: str) -> float | None:
    value = headers.get(name)
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


def _json(body: bytes | str | None) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None
