"""Graph's throttling of identity requests: RU and write budgets per app and tenant.

Each app+tenant pair has two rolling windows, resource units and writes (GRAPH.md,
"Throttling"). A request over budget is refused with the time until the budget would allow
it; a request that arrives before that time is up is charged anyway and refused again, which
is what makes an impatient client's throttle last longer, and is counted as an early retry.

A request that arrives just after another one was told to wait was most likely on its way
before its client heard (another worker process, a request already on the wire); within
`IN_FLIGHT_S` only a retry of the throttled request itself (same `client-request-id`) is early.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from sandbox.config import SandboxConfig

# Above this share of a budget, answers carry `x-ms-throttle-limit-percentage`.
WARNING_RATIO = 0.8
# Graph reports usage between 0.8 and 1.8 in that header.
MAX_REPORTED_RATIO = 1.8
# Costs in resource units (GRAPH.md): a users collection, a member list, anything else.
USERS_COLLECTION_RU = 2
GROUP_MEMBERS_RU = 3
OTHER_READ_RU = 1
WRITE_RU = 1
# `$top` below this saves one RU.
SMALL_TOP = 20
MIN_RU = 1
# How long after a 429 a request from elsewhere in the app may still have been in flight.
IN_FLIGHT_S = 0.1


class ThrottleReason(StrEnum):
    """Which budget refused a request, as `x-ms-throttle-information` names it."""

    RESOURCE_UNITS = "ResourceUnitLimitExceeded"
    WRITES = "WriteLimitExceeded"


@dataclass(frozen=True)
class Cost:
    """What one request costs: resource units and writes."""

    ru: int
    writes: int = 0


def request_cost(
    method: str,
    *,
    users_collection: bool = False,
    group_members: bool = False,
    select: bool = False,
    expand: bool = False,
    top: int | None = None,
    writes: int = 1,
) -> Cost:
    """The cost of a Graph request under the identity-and-access rules."""
    if method != "GET":
        return Cost(WRITE_RU, writes)
    if users_collection:
        ru = USERS_COLLECTION_RU
    elif group_members:
        ru = GROUP_MEMBERS_RU
    else:
        ru = OTHER_READ_RU
    if select:
        ru -= 1
    if expand:
        ru += 1
    if top is not None and top < SMALL_TOP:
        ru -= 1
    return Cost(max(MIN_RU, ru))


@dataclass
class _Window:
    """Usage of one budget over a rolling window, and how long its app was told to wait."""

    events: deque[tuple[float, int]] = field(default_factory=deque)
    used: int = 0
    blocked_until: float = -math.inf

    def expire(self, now: float, window_s: float) -> None:
        """Forget usage older than the window."""
        while self.events and self.events[0][0] <= now - window_s:
            self.used -= self.events.popleft()[1]

    def charge(self, now: float, amount: int) -> None:
        """Count `amount` units used now."""
        self.events.append((now, amount))
        self.used += amount

    def wait_s(self, now: float, amount: int, limit: int, window_s: float) -> float:
        """Seconds until `amount` more units fit under `limit`; infinite if they never will."""
        excess = self.used + amount - limit
        if excess <= 0:
            return 0.0
        for at, units in self.events:
            excess -= units
            if excess <= 0:
                return at + window_s - now
        return math.inf


class _Charge(NamedTuple):
    """One budget a request draws on, with what it draws and the budget's size."""

    window: _Window
    amount: int
    limit: int
    window_s: float

    def over(self) -> bool:
        return self.window.used + self.amount > self.limit

    def wait_s(self, now: float) -> float:
        return self.window.wait_s(now, self.amount, self.limit, self.window_s)


@dataclass(frozen=True)
class Verdict:
    """The throttle's answer to one request."""

    allowed: bool
    ru_charged: int
    usage_ratio: float
    early_retry: bool = False
    retry_after_s: int = 0
    reason: ThrottleReason | None = None
    scope: str = ""


@dataclass
class _Waits:
    """The waits an app was told and are not over yet, to tell early retries from requests
    already in flight."""

    # (told at, wait until) of every 429 whose wait is not over.
    told: list[tuple[float, float]] = field(default_factory=list)
    # client-request-id of each throttled request -> until when it was told to wait.
    requests: dict[str, float] = field(default_factory=dict)

    def tell(self, now: float, until: float, request_key: str) -> None:
        self.told.append((now, until))
        if request_key:
            self.requests[request_key] = max(self.requests.get(request_key, until), until)

    def is_early(self, now: float, request_key: str) -> bool:
        """Whether a request arriving now was sent before a wait it knew of was over."""
        self.told = [(at, until) for at, until in self.told if until > now]
        self.requests = {key: until for key, until in self.requests.items() if until > now}
        if request_key in self.requests:
            return True
        return any(at + IN_FLIGHT_S <= now for at, _ in self.told)


@dataclass
class _AppBudget:
    ru: _Window = field(default_factory=_Window)
    writes: _Window = field(default_factory=_Window)
    waits: _Waits = field(default_factory=_Waits)


class Throttle:
    """Budgets of every app+tenant pair; the caller holds the lock."""

    def __init__(self, config: Callable[[], SandboxConfig]) -> None:
        # A callable, so budgets changed at run time apply to the next request.
        self._config = config
        self._budgets: dict[tuple[str, str], _AppBudget] = {}

    def admit(
        self, app_id: str, tenant_id: str, cost: Cost, now: float, request_key: str = ""
    ) -> Verdict:
        """Charge and allow a request, or refuse it with how long to wait.

        `request_key` is the request's `client-request-id`: the same on every retry of it.
        """
        config = self._config()
        budget = self._budgets.setdefault((app_id, tenant_id), _AppBudget())
        budget.ru.expire(now, config.ru_window_s)
        budget.writes.expire(now, config.write_window_s)
        charges = [_Charge(budget.ru, cost.ru, config.ru_per_window, config.ru_window_s)]
        if cost.writes:
            charges.append(
                _Charge(budget.writes, cost.writes, config.writes_per_window, config.write_window_s)
            )
        refusing = [c for c in charges if now < c.window.blocked_until]
        charged_while_blocked = bool(refusing)
        early = budget.waits.is_early(now, request_key)
        if charged_while_blocked:
            # Graph keeps counting while the app is told to wait: charge, then refuse again.
            for c in charges:
                c.window.charge(now, c.amount)
        else:
            refusing = [c for c in charges if c.over()]
            if not refusing:
                for c in charges:
                    c.window.charge(now, c.amount)
                return Verdict(True, cost.ru, self._ratio(budget, config), early_retry=early)
        wait_s = max(c.wait_s(now) for c in refusing)
        # A request larger than the whole budget never fits; say so with the window length.
        retry_after_s = math.ceil(min(wait_s, max(c.window_s for c in refusing)))
        retry_after_s = max(1, retry_after_s)
        for c in refusing:
            c.window.blocked_until = max(c.window.blocked_until, now + retry_after_s)
        budget.waits.tell(now, now + retry_after_s, request_key)
        writes_refused = any(c.window is budget.writes for c in refusing)
        return Verdict(
            False,
            cost.ru if charged_while_blocked else 0,
            self._ratio(budget, config),
            early_retry=early,
            retry_after_s=retry_after_s,
            reason=ThrottleReason.WRITES if writes_refused else ThrottleReason.RESOURCE_UNITS,
            scope="Tenant_Application/{}/{}/{}".format(
                "Write" if writes_refused else "ReadWrite", app_id, tenant_id
            ),
        )

    def told_to_wait(
        self, app_id: str, tenant_id: str, now: float, until: float, request_key: str = ""
    ) -> None:
        """Remember that an injected 429 told this app to wait until `until`."""
        budget = self._budgets.setdefault((app_id, tenant_id), _AppBudget())
        budget.waits.tell(now, until, request_key)

    @staticmethod
    def _ratio(budget: _AppBudget, config: SandboxConfig) -> float:
        return max(
            budget.ru.used / config.ru_per_window,
            budget.writes.used / config.writes_per_window,
        )
