"""Every setting of the Graph sandbox, each default a named constant."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sandbox.directory import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET, SANDBOX_TENANT_ID

# Lifetime of an issued access token, in seconds (what Entra answers as `expires_in`).
DEFAULT_TOKEN_LIFETIME_S = 3599
# Resource-unit budget per app and tenant: RU per rolling window of this many seconds
# (GRAPH.md: 8,000 per 10 s for a tenant of more than 500 users).
DEFAULT_RU_PER_WINDOW = 8000
DEFAULT_RU_WINDOW_S = 10.0
# Write budget per app and tenant: write requests per rolling window of this many seconds.
DEFAULT_WRITES_PER_WINDOW = 3000
DEFAULT_WRITE_WINDOW_S = 150.0
# How many extra users `user{n}@contoso.example` to seed, for paging and benchmarks.
DEFAULT_BULK_USERS = 0
# Seconds of latency added to every Graph request (not token or control requests): the median.
DEFAULT_LATENCY_S = 0.0
# The 99th percentile of that latency; 0 (or the median) means every request takes the median.
# Real Graph answers reads in about 100-300 ms and a 20-member PATCH often slower, with a tail.
DEFAULT_LATENCY_P99_S = 0.0
# The standard normal's 99th percentile: a log-normal latency's p99 is its median * e^(Z99 sigma).
_Z99 = 2.3263478740408408
# No request waits longer than this many times the p99: the log-normal's tail has no end.
MAX_LATENCY_OVER_P99 = 4.0
# Largest `$top` Graph accepts when listing group members, and the page size without `$top`.
DEFAULT_MEMBERS_PAGE_MAX = 999
DEFAULT_MEMBERS_PAGE_SIZE = 100
# Writes one group answers at once before it answers 503 (real tenants: about 5, GRAPH.md);
# 0: no limit.
DEFAULT_MAX_GROUP_WRITES_IN_FLIGHT = 0
# Base URL used in `@odata.nextLink` when a request has no Host header (in-process calls).
DEFAULT_PUBLIC_URL = "http://localhost"


class PatchWriteCost(StrEnum):
    """How many writes a `PATCH /groups/{id}` with `members@odata.bind` costs (undocumented)."""

    REQUEST = "request"  # one write for the whole request
    MEMBER = "member"  # one write per member bound


@dataclass
class SandboxConfig:
    """Settings of one sandbox; the runtime-changeable ones are listed in `RUNTIME_FIELDS`."""

    tenant_id: str = SANDBOX_TENANT_ID
    client_id: str = SANDBOX_CLIENT_ID
    client_secret: str = SANDBOX_CLIENT_SECRET
    token_lifetime_s: int = DEFAULT_TOKEN_LIFETIME_S
    ru_per_window: int = DEFAULT_RU_PER_WINDOW
    ru_window_s: float = DEFAULT_RU_WINDOW_S
    writes_per_window: int = DEFAULT_WRITES_PER_WINDOW
    write_window_s: float = DEFAULT_WRITE_WINDOW_S
    patch_write_cost: PatchWriteCost = PatchWriteCost.REQUEST
    bulk_users: int = DEFAULT_BULK_USERS
    latency_s: float = DEFAULT_LATENCY_S
    latency_p99_s: float = DEFAULT_LATENCY_P99_S
    members_page_max: int = DEFAULT_MEMBERS_PAGE_MAX
    members_page_size: int = DEFAULT_MEMBERS_PAGE_SIZE
    max_group_writes_in_flight: int = DEFAULT_MAX_GROUP_WRITES_IN_FLIGHT
    public_url: str = DEFAULT_PUBLIC_URL

    def __post_init__(self) -> None:
        positive = ("token_lifetime_s", "ru_per_window", "ru_window_s", "writes_per_window",
                    "write_window_s", "members_page_max", "members_page_size")  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if min(self.latency_s, self.latency_p99_s, self.bulk_users) < 0:
            raise ValueError("latency_s, latency_p99_s and bulk_users cannot be negative")
        if self.max_group_writes_in_flight < 0:
            raise ValueError("max_group_writes_in_flight cannot be negative")
        if 0 < self.latency_p99_s < self.latency_s:
            raise ValueError("latency_p99_s cannot be below latency_s, the median")

    def sampled_latency_s(self, rng: random.Random) -> float:
        """One Graph request's latency: log-normal with median `latency_s`, 99th percentile
        `latency_p99_s` (capped), or exactly `latency_s` when there is no spread."""
        if self.latency_s <= 0 or self.latency_p99_s <= self.latency_s:
            return self.latency_s
        sigma = math.log(self.latency_p99_s / self.latency_s) / _Z99
        sample_s = rng.lognormvariate(math.log(self.latency_s), sigma)
        return min(sample_s, MAX_LATENCY_OVER_P99 * self.latency_p99_s)

    def updated(self, changes: dict[str, Any]) -> SandboxConfig:
        """A copy with `changes` applied; ValueError for a field not changeable at run time."""
        unknown = set(changes) - RUNTIME_FIELDS
        if unknown:
            raise ValueError(f"not changeable at run time: {', '.join(sorted(unknown))}")
        typed: dict[str, Any] = {}
        for name, value in changes.items():
            current = getattr(self, name)
            # JSON has no enums and writes 10 for 10.0: coerce to the field's own type.
            typed[name] = type(current)(value)
        return dataclasses.replace(self, **typed)


# Settings `POST /_sandbox/config` may change; the identity and the seed stay fixed.
RUNTIME_FIELDS = frozenset(
    {
        "token_lifetime_s",
        "ru_per_window",
        "ru_window_s",
        "writes_per_window",
        "write_window_s",
        "patch_write_cost",
        "latency_s",
        "latency_p99_s",
        "members_page_max",
        "members_page_size",
        "max_group_writes_in_flight",
    }
)
