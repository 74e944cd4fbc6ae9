"""Counters of what the sandbox saw and did, for tests and benchmarks to assert on."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class RouteKind(StrEnum):
    """What a request addressed, as counted in the stats."""

    USER = "user"  # GET /users/{id-or-upn}, GET /users('...')
    USERS = "users"  # GET /users (with or without $filter)
    GROUP = "group"  # GET /groups/{id}
    GROUP_UPDATE = "group_update"  # PATCH /groups/{id}
    MEMBERS = "members"  # GET /groups/{id}/members
    MEMBER_ADD = "member_add"  # POST /groups/{id}/members/$ref
    MEMBER_REMOVE = "member_remove"  # DELETE /groups/{id}/members/{id}/$ref
    # DELETE /groups/{id}/members/{id} without /$ref: deletes the user object itself.
    MEMBER_OBJECT_DELETE = "member_object_delete"
    BATCH = "batch"  # POST /$batch (its parts are counted under their own kinds)
    TOKEN = "token"  # POST /{tenant}/oauth2/v2.0/token
    UNKNOWN = "unknown"  # any other Graph path


@dataclass
class Stats:
    """Counters since the sandbox started or was last reset; the caller holds the lock."""

    requests: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    responses: Counter[int] = field(default_factory=Counter)
    # 429s from the budgets (not from injected faults).
    throttled: int = 0
    # Requests that arrived while their app had been told to wait by a 429.
    early_retries: int = 0
    # Writes answered 503 because their group had `max_group_writes_in_flight` already.
    busy_group_refusals: int = 0
    fault_hits: int = 0
    ru_charged: int = 0
    members_added: int = 0
    members_removed: int = 0
    users_deleted: int = 0

    def count_request(self, method: str, kind: RouteKind) -> None:
        """Count one request (a `$batch` part counts as one)."""
        self.requests[method][kind] += 1

    def as_json(self) -> dict[str, Any]:
        """The counters as `GET /_sandbox/stats` answers them."""
        return {
            "requests": {method: dict(kinds) for method, kinds in self.requests.items()},
            "requests_total": sum(sum(kinds.values()) for kinds in self.requests.values()),
            "responses": {str(status): n for status, n in sorted(self.responses.items())},
            "throttled": self.throttled,
            "early_retries": self.early_retries,
            "busy_group_refusals": self.busy_group_refusals,
            "fault_hits": self.fault_hits,
            "ru_charged": self.ru_charged,
            "members_added": self.members_added,
            "members_removed": self.members_removed,
            "users_deleted": self.users_deleted,
            "writes_applied": self.members_added + self.members_removed + self.users_deleted,
        }
