"""Injected faults: rules that make matching requests fail, stall or half-succeed."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from sandbox.responses import GraphAnswer

# Graph's error code for each status a fault may answer, unless the rule names its own.
DEFAULT_CODES = {
    400: "BadRequest",
    401: "InvalidAuthenticationToken",
    403: "Authorization_RequestDenied",
    404: "Request_ResourceNotFound",
    429: "TooManyRequests",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}
FALLBACK_CODE = "UnknownError"
# Seed of a rule's random draws when it gives none, so ratios repeat run after run.
DEFAULT_FAULT_SEED = 0


@dataclass
class FaultRule:
    """Which requests a fault hits and what they get instead of (or after) the real answer."""

    path_regex: str  # searched in the request path (no query string), e.g. r"/members/\$ref$"
    method: str | None = None  # None: any method
    status: int | None = None  # None: answer normally (only `delay_s` applies)
    code: str | None = None  # Graph error code; None: the usual one for `status`
    message: str = "Injected fault."
    retry_after: str | None = None  # raw `Retry-After` value: "2", "0.5", an HTTP date
    count: int | None = None  # hit this many matching requests, then retire
    ratio: float = 1.0  # share of matching requests hit, drawn with `seed`
    duration_s: float | None = None  # active this long after being added
    seed: int = DEFAULT_FAULT_SEED
    apply_first: bool = False  # perform the request, then answer the error anyway
    delay_s: float = 0.0  # sleep this long before answering
    hits: int = 0
    added_at: float = 0.0
    _pattern: re.Pattern[str] = field(init=False, repr=False)
    _random: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._pattern = re.compile(self.path_regex)
        self._random = random.Random(self.seed)
        if self.method is not None:
            self.method = self.method.upper()
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError("ratio must be between 0 and 1")

    @classmethod
    def from_json(cls, spec: dict[str, Any], now: float) -> FaultRule:
        """A rule from the JSON body of `POST /_sandbox/faults`."""
        allowed = {
            "path_regex", "method", "status", "code", "message", "retry_after", "count", "ratio",
            "duration_s", "seed", "apply_first", "delay_s",
        }  # fmt: skip
        unknown = set(spec) - allowed
        if unknown:
            raise ValueError(f"unknown fault fields: {', '.join(sorted(unknown))}")
        if "path_regex" not in spec:
            raise ValueError("a fault needs a 'path_regex'")
        retry_after = spec.get("retry_after")
        if retry_after is not None:
            # Accept 2 as well as "2"; the header value is sent exactly as written.
            spec = {**spec, "retry_after": str(retry_after)}
        return cls(**spec, added_at=now)

    def expired(self, now: float) -> bool:
        """Whether the rule can hit nothing more."""
        if self.count is not None and self.hits >= self.count:
            return True
        return self.duration_s is not None and now >= self.added_at + self.duration_s

    def hit(self, method: str, path: str, now: float) -> bool:
        """Whether this request is hit; counts the hit."""
        if self.expired(now) or (self.method is not None and self.method != method):
            return False
        if self._pattern.search(path) is None:
            return False
        if self.ratio < 1.0 and self._random.random() >= self.ratio:
            return False
        self.hits += 1
        return True

    def answer(self) -> GraphAnswer:
        """The error this rule answers with; only for a rule with a status."""
        assert self.status is not None
        code = self.code or DEFAULT_CODES.get(self.status, FALLBACK_CODE)
        headers = {} if self.retry_after is None else {"Retry-After": self.retry_after}
        return GraphAnswer(self.status, {"error": {"code": code, "message": self.message}}, headers)

    def retry_after_s(self) -> float | None:
        """How long the `Retry-After` value tells a client to wait, if it says."""
        if self.retry_after is None:
            return None
        try:
            return max(0.0, float(self.retry_after))
        except ValueError:
            pass
        try:
            when = parsedate_to_datetime(self.retry_after)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            # RFC 9110 dates are GMT even when the zone is written as -0000.
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - datetime.now(UTC)).total_seconds())

    def as_json(self) -> dict[str, Any]:
        """The rule as `GET /_sandbox/faults` shows it."""
        return {
            "path_regex": self.path_regex,
            "method": self.method,
            "status": self.status,
            "code": self.code,
            "retry_after": self.retry_after,
            "count": self.count,
            "ratio": self.ratio,
            "duration_s": self.duration_s,
            "apply_first": self.apply_first,
            "delay_s": self.delay_s,
            "hits": self.hits,
        }


class FaultBook:
    """The active fault rules; the caller holds the lock."""

    def __init__(self) -> None:
        self.rules: list[FaultRule] = []

    def add(self, rule: FaultRule) -> None:
        """Add a rule; earlier rules win when several match."""
        self.rules.append(rule)

    def clear(self) -> None:
        """Remove every rule."""
        self.rules.clear()

    def match(self, method: str, path: str, now: float) -> FaultRule | None:
        """The first rule that hits this request, if any; retired rules are dropped."""
        self.rules = [rule for rule in self.rules if not rule.expired(now)]
        for rule in self.rules:
            if rule.hit(method, path, now):
                return rule
        return None
