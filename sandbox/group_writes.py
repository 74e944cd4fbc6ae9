"""How many membership writes each group has in flight, and Graph's 503 past a few.

Real tenants answer 503 to writes to one group past about five at once (GRAPH.md: GMM saw
it past 5 PATCHes in a `$batch`). A request writes to a group while it is being answered, its
latency included; a `$batch` writes to each group one of its non-GET parts names, once.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Collection

from sandbox.odata import path_segments

GROUPS_SEGMENT = "groups"
READ_METHOD = "GET"


def written_groups(method: str, segments: list[str], body: bytes, *, batch: bool) -> set[str]:
    """The groups (lower-case ids) a Graph request writes to; a `$batch` read leniently."""
    if not batch:
        return _written_group(method, segments)
    try:
        payload = json.loads(body or b"null")
    except ValueError:
        return set()  # refused as a bad batch before any part runs
    parts = payload.get("requests") if isinstance(payload, dict) else None
    groups: set[str] = set()
    for part in parts if isinstance(parts, list) else []:
        if isinstance(part, dict):
            path = str(part.get("url", "")).lstrip("/").partition("?")[0]
            groups |= _written_group(str(part.get("method", READ_METHOD)), path_segments(path))
    return groups


def _written_group(method: str, segments: list[str]) -> set[str]:
    if method.upper() == READ_METHOD or segments[:1] != [GROUPS_SEGMENT] or len(segments) < 2:
        return set()
    return {segments[1].lower()}


class GroupWrites:
    """The writes in flight per group; `enter` refuses a request that would pass the limit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()

    def enter(self, groups: Collection[str], limit: int) -> bool:
        """Count a request writing to `groups` in, unless one of them has `limit` already."""
        with self._lock:
            if limit and any(self._in_flight[group] >= limit for group in groups):
                return False
            self._in_flight.update(groups)
            return True

    def leave(self, groups: Collection[str]) -> None:
        """Count a request that `enter` admitted out."""
        with self._lock:
            self._in_flight.subtract(groups)
            for group in groups:
                if self._in_flight[group] <= 0:
                    del self._in_flight[group]
