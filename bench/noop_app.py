"""The baseline: a plain Celery app whose tasks do nothing, on the same broker and machine.

Run as its own worker (`celery -A bench.noop_app worker`), it measures what Celery and Redis
cost by themselves, so entraflow's figures can be read as a ratio against it.
"""

from __future__ import annotations

import os

from celery import Celery

NOOP_QUEUE = "bench:noop"

noop_app = Celery(
    "bench-noop",
    broker=os.environ.get("BENCH_REDIS_URL"),
    backend=os.environ.get("BENCH_REDIS_URL"),
)
noop_app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_default_queue=NOOP_QUEUE,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
)


@noop_app.task(name="bench.noop")
def noop(run_id: str, step_id: str) -> None:
    """Do nothing: the cost of one chain link without any work."""
