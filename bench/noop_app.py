"""The baseline: a plain Celery app whose tasks do nothing, on the same broker and machine.

Run as its own worker (`celery -A bench.noop_app:noop_app worker`), it measures what Celery and
Redis cost by themselves, so entraflow's figures can be read as a ratio against it. The first
and last link of a chain write down when they ran, as entraflow's run history does.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

NOOP_QUEUE = "bench:noop"
# Hashes of chain id -> wall-clock time: the first link started, the last link finished.
STARTED_KEY = "bench:noop:started"
FINISHED_KEY = "bench:noop:finished"

noop_app = Celery("bench-noop", broker=os.environ.get("BENCH_REDIS_URL"))
noop_app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_default_queue=NOOP_QUEUE,
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
)
_clock_store = redis.Redis.from_url(os.environ.get("BENCH_REDIS_URL") or "redis://localhost")


@noop_app.task(name="bench.noop")
def noop(chain_id: str, position: int, length: int) -> None:
    """Do nothing but note the time at a chain's ends: one chain link without any work."""
    if position == 0:
        _clock_store.hset(STARTED_KEY, chain_id, time.time())
    if position == length - 1:
        _clock_store.hset(FINISHED_KEY, chain_id, time.time())
