"""The schedulers' housekeeping: trim the events stream, queue stranded work, prune the history.

Every scheduler calls for a round every `HOUSEKEEPING_INTERVAL_S`; a lock in Redis lets one of
them do it. A run or batch committed but never queued (its starter died in between), or whose
message was lost with a worker, is queued again; runs past `runs_retention_days` are deleted.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import redis

from entraflow import keys
from entraflow.settings import Settings
from models.history import prune_history
from models.runs import utcnow
from scheduler.batches import enqueue_stranded_batches
from scheduler.runs import enqueue_stranded_runs

log = logging.getLogger(__name__)

# How often the stream is trimmed and stranded runs re-queued, by one scheduler at a time.
HOUSEKEEPING_INTERVAL_S = 30.0


def housekeeping_round(settings: Settings, redis_client: redis.Redis, consumer: str) -> None:
    """Trim the stream, queue stranded runs and batches, prune; one scheduler per round.

    The schedulers' consumer group must exist.
    """
    interval_ms = int(HOUSEKEEPING_INTERVAL_S * 1000)
    if not redis_client.set(keys.SCHEDULER_HOUSEKEEPING_LOCK, consumer, nx=True, px=interval_ms):
        return
    trim_events(settings, redis_client)
    stranded = enqueue_stranded_runs(settings)
    if stranded:
        log.warning(
            "queued %d runs on no queue: never queued, or their message lost with a worker",
            len(stranded),
        )
    stranded_batches = enqueue_stranded_batches(settings)
    if stranded_batches:
        log.warning(
            "queued %d batches missing a message: never queued, or lost with a worker",
            len(stranded_batches),
        )
    retention_days = settings.runs_retention_days
    if retention_days is not None:
        pruned = prune_history(
            settings.resolved_database_url,
            utcnow() - timedelta(days=retention_days),
            events_min_keep=timedelta(days=settings.accepted_events_min_keep_days),
        )
        if pruned.runs or pruned.accepted_events:
            log.info("pruned history older than %d days: %s", retention_days, pruned)


def trim_events(settings: Settings, redis_client: redis.Redis) -> int:
    """Trim the stream to about `events_max_len` entries, never past an unacknowledged one.

    The schedulers' consumer group must exist. Returns how many entries were removed.
    """
    pipe = redis_client.pipeline(transaction=True)
    # Read in one MULTI: an entry delivered between two separate reads could be trimmed.
    pipe.xinfo_groups(keys.EVENTS_STREAM)
    pipe.xpending(keys.EVENTS_STREAM, keys.SCHEDULERS_GROUP)
    pipe.xrevrange(keys.EVENTS_STREAM, count=settings.events_max_len + 1)
    groups, pending, newest = pipe.execute()
    if len(newest) <= settings.events_max_len:
        return 0
    bounds = [_stream_id(newest[-2][0])]  # the oldest entry to keep
    for group in groups:
        # Entries after a group's last delivered one have not been read by it yet.
        bounds.append(_next_id(_stream_id(group["last-delivered-id"])))
    if pending["pending"]:
        bounds.append(_stream_id(pending["min"]))
    low = min(bounds)
    removed = int(
        redis_client.xtrim(keys.EVENTS_STREAM, minid=f"{low[0]}-{low[1]}", approximate=False)
    )
    if removed:
        log.info("trimmed %d acknowledged events from the stream", removed)
    return removed


def _stream_id(value: bytes | str) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else value
    milliseconds, _, sequence = text.partition("-")
    return int(milliseconds), int(sequence or 0)


def _next_id(stream_id: tuple[int, int]) -> tuple[int, int]:
    return stream_id[0], stream_id[1] + 1
