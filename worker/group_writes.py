"""At most a few writes to one group in flight, across every worker and thread (Redis).

Graph answers 503 to writes to one group past about five at once (GRAPH.md), and a worker of
many threads could send dozens: each bulk chunk of a large group, each step of an HR burst
adding hires to "All staff". So a request that writes to groups first takes a slot of each,
all or none at once, and gives them back when answered. Each group's slots are a sorted set
of request tokens scored by when their lease ends: a worker that dies holding one frees it at
its lease's end.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import redis

from entraflow import keys
from worker.budget import BATCH_PATH
from worker.errors import SharedLimitError

# A write to a group by path below the Graph URL: PATCH /groups/{id}, POST or DELETE
# /groups/{id}/members/...; the id is what addressing put there (a GUID).
_GROUP_WRITE_PATH = re.compile(r"^/groups/([^/?]+)(?:[/?]|$)")
READ_METHOD = "GET"
# How often a request waiting for a slot looks again.
SLOT_POLL_S = 0.05

# KEYS: the groups' slot sets. ARGV: token, slots per group, lease ms.
# Returns 1 with a slot of every group taken, else 0 (nothing taken).
_TAKE = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local lease = tonumber(ARGV[3])
for _, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= tonumber(ARGV[2]) then return 0 end
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + lease, ARGV[1])
  redis.call('PEXPIRE', key, lease)
end
return 1
"""


class GroupBusyError(SharedLimitError):
    """Raised when a group's write slots stayed taken longer than a worker should wait."""

    summary = "every write slot of the group is taken"


def written_groups(method: str, target: str, body: Any) -> list[str]:
    """The groups (lower-case ids, sorted) a request to `target` writes to; none for a read.

    A `$batch` writes to each group one of its non-GET parts names.
    """
    if method.upper() == READ_METHOD:
        return []
    if target.partition("?")[0] != BATCH_PATH:
        match = _GROUP_WRITE_PATH.match(target)
        return [match.group(1).lower()] if match else []
    parts = body.get("requests") if isinstance(body, Mapping) else None
    groups: set[str] = set()
    for part in parts if isinstance(parts, list) else []:
        if isinstance(part, Mapping):
            part_target = "/" + str(part.get("url", "")).lstrip("/")
            groups.update(written_groups(str(part.get("method", READ_METHOD)), part_target, None))
    return sorted(groups)


class GroupWriteSlots:
    """`per_group` write slots per group of one app in one tenant, shared through Redis."""

    def __init__(
        self,
        redis_client: redis.Redis,
        app_id: str,
        tenant_id: str,
        *,
        per_group: int,
        lease_s: float,
        max_wait_s: float,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_group = per_group
        self.lease_s = lease_s
        self.max_wait_s = max_wait_s
        self._redis = redis_client
        self._take = redis_client.register_script(_TAKE)
        self._app_id = app_id
        self._tenant_id = tenant_id
        self._sleep = sleep
        self._clock = clock

    @contextmanager
    def holding(self, groups: Collection[str]) -> Iterator[None]:
        """Hold a slot of each of `groups` for the block; none to hold for no groups.

        Waits while a group has every slot taken; raises `GroupBusyError` after `max_wait_s`,
        for the caller to try again later.
        """
        if not groups:
            yield
            return
        slot_keys = [keys.group_writes(self._app_id, self._tenant_id, group) for group in groups]
        token = uuid.uuid4().hex
        self._acquire(slot_keys, token)
        try:
            yield
        finally:
            pipeline = self._redis.pipeline(transaction=False)
            for key in slot_keys:
                pipeline.zrem(key, token)
            pipeline.execute()

    def _acquire(self, slot_keys: list[str], token: str) -> None:
        deadline = self._clock() + self.max_wait_s
        lease_ms = max(1, round(self.lease_s * 1000))
        while not self._take(keys=slot_keys, args=[token, self.per_group, lease_ms]):
            if self._clock() >= deadline:
                raise GroupBusyError(
                    f"{len(slot_keys)} group(s) kept all {self.per_group} write slots taken "
                    f"for {self.max_wait_s:g} s"
                )
            self._sleep(SLOT_POLL_S)
