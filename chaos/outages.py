"""Issue 7, scenarios 3 and 4: Redis restarted, and the database away, in the middle of the work.

Each fault lands on a bulk batch and on a stream of `chaos-lookup-add` runs, two steps each so a
chain must go on across it, published during the fault by a producer that retries as any
producer must when Redis does not answer. The service is taken away once a share of the work
has ended and brought back; then the final state is checked. No process is restarted: the
worker and the scheduler must find their way back by themselves.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import redis
from sqlalchemy.engine import make_url

from chaos.harness import (
    LOOKUP_ADD_EVENT_TYPE,
    Harness,
    Result,
    Scenario,
    Sizes,
    Tally,
    measured,
    wait_for,
)
from entraflow import keys
from entraflow.celery_app import PUBLISH_PATIENCE_S
from entraflow.redis_server import EmbeddedRedis
from models.batch_reports import batch_view
from models.db import SQLITE_BUSY_TIMEOUT_S
from models.runs import FINAL_RUN_STATUSES
from sandbox.directory import DEMO_GROUPS
from scheduler.producer import publish_raw
from worker.tasks import REDIS_PATIENCE_S

# Every Graph request (not the token endpoint, which answers through its own path).
GRAPH_PATHS = r"^/v1\.0/"
# What each Graph request takes, about as long as Graph's own answers: the work then lasts long
# enough for a fault to land in the middle of it, even in the short form.
GRAPH_LATENCY_S = 0.1
# The fault starts once this share of the runs and rows has ended.
FAULT_AT_SHARE = 0.3
# How long the work may take to reach `FAULT_AT_SHARE` before the fault starts anyway.
FAULT_START_TIMEOUT_S = 60.0
# A producer that finds Redis away tries the same event again after this long.
PRODUCER_RETRY_S = 0.25
# These scenarios add their users to this group; the others use other groups.
OUTAGE_GROUP = DEMO_GROUPS["sales"].id


# How each restart takes Redis away: SHUTDOWN writes the AOF out; SIGKILL is a crash, where
# only what the server wrote before answering survives (everything, with appendonly yes).
CLEAN = "clean (SHUTDOWN)"
HARD = "hard (SIGKILL)"
REDIS_STOPS: dict[str, Callable[[EmbeddedRedis], None]] = {
    CLEAN: lambda server: server.stop(keep_port=True),
    HARD: EmbeddedRedis.kill,
}
# A Redis away longer than this outlasts every wait of the processes (a step's Redis commands,
# then its retry's publish): what they could not send must still not be lost.
LONGEST_WAIT_S = REDIS_PATIENCE_S + PUBLISH_PATIENCE_S


@dataclass(frozen=True)
class OutageSizes:
    """How much work one outage asks for, which outages there are, and how long each lasts."""

    runs: int
    rows: int
    events_per_s: float  # the producer's pace: the stream spans the fault
    # Each Redis restart: how it stops Redis (a key of `REDIS_STOPS`) and how long Redis is away.
    redis_restarts: tuple[tuple[str, float], ...]
    # How long the database stays locked, once per entry: shorter than the busy timeout (every
    # write waits it out) or longer (writes fail, and are tried again).
    database_locks_s: tuple[float, ...]
    settle_timeout_s: float  # how long the work may take to end once the service is back


FULL_OUTAGE = OutageSizes(
    runs=300,
    rows=2000,
    events_per_s=20.0,
    redis_restarts=((CLEAN, 10.0), (HARD, 10.0), (HARD, LONGEST_WAIT_S + 15.0)),
    database_locks_s=(20.0, SQLITE_BUSY_TIMEOUT_S + 10.0),
    settle_timeout_s=600.0,
)
SHORT_OUTAGE = OutageSizes(
    runs=40,
    rows=400,
    events_per_s=8.0,
    redis_restarts=((CLEAN, 3.0), (HARD, 3.0)),
    database_locks_s=(8.0, SQLITE_BUSY_TIMEOUT_S + 5.0),
    settle_timeout_s=90.0,
)


def outage_sizes(sizes: Sizes) -> OutageSizes:
    return SHORT_OUTAGE if sizes.short else FULL_OUTAGE


def redis_restart(harness: Harness, sizes: Sizes) -> list[Result]:
    """Issue 7, scenario 3: Redis restarted, with its AOF, in the middle of runs and a batch."""
    server = EmbeddedRedis.for_settings(harness.stack.settings)
    if server.url != harness.stack.redis_url:
        raise RuntimeError("the stack's Redis is not the embedded one: it cannot be restarted")
    return [
        _redis_restart(harness, sizes, index, variant, down_s, server)
        for index, (variant, down_s) in enumerate(outage_sizes(sizes).redis_restarts)
    ]


def _redis_restart(
    harness: Harness,
    sizes: Sizes,
    index: int,
    variant: str,
    down_s: float,
    server: EmbeddedRedis,
) -> Result:
    own = outage_sizes(sizes)

    @contextmanager
    def restarted() -> Iterator[None]:
        REDIS_STOPS[variant](server)
        try:
            yield
        finally:
            # On the same port: every process of the stack holds the URL.
            server.start_again()

    asked = f"{own.runs} runs + {own.rows} rows, Redis away {down_s:g}s"
    longest = ", past every wait" if down_s > LONGEST_WAIT_S else ""
    return measured(
        harness,
        f"redis restart, {variant}{longest}",
        asked,
        lambda tally: _through_outage(
            harness,
            sizes,
            tally,
            f"chaos/redis-restart/{index}",
            "Redis",
            down_s,
            restarted,
        ),
    )


def database_outage(harness: Harness, sizes: Sizes) -> list[Result]:
    """Issue 7, scenario 4: the database unavailable for a while in the middle of the work."""
    own = outage_sizes(sizes)
    url = make_url(harness.database_url)
    if url.get_backend_name() != "sqlite" or not url.database:
        raise RuntimeError("the database outage is made with a SQLite lock; the stack has none")
    return [
        _database_outage(harness, sizes, index, down_s, str(url.database))
        for index, down_s in enumerate(own.database_locks_s)
    ]


def _database_outage(
    harness: Harness, sizes: Sizes, index: int, down_s: float, path: str
) -> Result:
    own = outage_sizes(sizes)
    return measured(
        harness,
        f"database outage, {_lock_variant(down_s)}",
        f"{own.runs} runs + {own.rows} rows, database locked {down_s:g}s",
        lambda tally: _through_outage(
            harness,
            sizes,
            tally,
            f"chaos/database-outage/{index}",
            "database",
            down_s,
            lambda: sqlite_locked(path),
        ),
    )


def _lock_variant(down_s: float) -> str:
    if down_s < SQLITE_BUSY_TIMEOUT_S:
        return "writes wait"
    return "writes fail"


@contextmanager
def sqlite_locked(path: str) -> Iterator[None]:
    """Hold SQLite's write lock, as a database that stopped answering would hold every writer.

    Each write elsewhere waits for the lock, and fails with "database is locked" once it has
    waited its busy timeout. Readers go on: in WAL mode only a connection that has the file to
    itself can keep them out, which no live stack allows. Nothing is written: it rolls back.
    """
    holder = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
    finally:
        holder.close()


def _users_per_outage(sizes: Sizes) -> int:
    own = outage_sizes(sizes)
    return own.runs + own.rows


SCENARIOS = [
    Scenario(
        "redis-restart",
        3,
        redis_restart,
        lambda sizes: len(outage_sizes(sizes).redis_restarts) * _users_per_outage(sizes),
    ),
    Scenario(
        "database-outage",
        4,
        database_outage,
        lambda sizes: len(outage_sizes(sizes).database_locks_s) * _users_per_outage(sizes),
    ),
]


def _through_outage(
    harness: Harness,
    sizes: Sizes,
    tally: Tally,
    source: str,
    service: str,
    down_s: float,
    outage: Callable[[], AbstractContextManager[None]],
) -> str:
    """Runs streaming in and a batch, `outage` held for `down_s` midway, then the checks."""
    own = outage_sizes(sizes)
    run_users = harness.users(own.runs)
    row_users = harness.users(own.rows)
    before = harness.members(OUTAGE_GROUP)
    stats_before = harness.sandbox.stats()
    dead_before = harness.redis.xlen(keys.DEAD_EVENTS_STREAM)
    harness.sandbox.add_fault(GRAPH_PATHS, delay_s=GRAPH_LATENCY_S)
    batch_id = harness.submit_adds(source, row_users, OUTAGE_GROUP)
    producer = _Producer(harness, source, run_users, own.events_per_s)
    started_at = time.monotonic()
    producer.start()
    total = own.runs + own.rows
    wait_for(
        lambda: _ended(harness, source, batch_id) >= FAULT_AT_SHARE * total,
        started_at + FAULT_START_TIMEOUT_S,
    )
    ended_before = _ended(harness, source, batch_id)
    down_at = time.monotonic()
    with outage():
        time.sleep(down_s)
    back_at = time.monotonic()
    ended_back = _ended(harness, source, batch_id)
    finished = wait_for(
        lambda: (
            producer.done.is_set()
            and harness.runs_final(source, own.runs)
            and harness.batch_final(batch_id)
        ),
        back_at + own.settle_timeout_s,
    )
    final_s = time.monotonic() - back_at
    producer.stop.set()
    producer.join()
    harness.check_runs(source, producer.published, tally)
    tally.lose(own.runs - len(producer.published), "events the producer could not publish")
    harness.check_batch(batch_id, own.rows, tally)
    harness.check_members(OUTAGE_GROUP, before, [*run_users, *row_users], tally)
    tally.lose(harness.redis.xlen(keys.DEAD_EVENTS_STREAM) - dead_before, "events dead-lettered")
    stats = harness.sandbox.stats()
    writes = stats["writes_applied"] - stats_before["writes_applied"]
    state = (
        f"all final {final_s:.1f}s after it was back"
        if finished
        else f"NOT FINAL {own.settle_timeout_s:g}s after it was back"
    )
    return (
        f"{service} away {back_at - down_at:.1f}s from {ended_before}/{total} ended to "
        f"{ended_back}, {state}; {producer.retries} producer retries, {writes} writes applied"
    )


def _ended(harness: Harness, source: str, batch_id: str) -> int:
    """Runs and batch rows that have ended."""
    runs = sum(status in FINAL_RUN_STATUSES for _, _, status in harness.runs(source))
    view = batch_view(harness.database_url, batch_id)
    return runs + (int(view["done"]) if view else 0)


class _Producer(threading.Thread):
    """One `chaos-lookup-add` event per user, at a steady pace, retried while Redis is away."""

    def __init__(self, harness: Harness, source: str, users: list[int], per_s: float) -> None:
        super().__init__(name="chaos-producer", daemon=True)
        self.harness = harness
        self.source = source
        self.users = users
        self.interval_s = 1 / per_s
        self.published: list[str] = []
        self.retries = 0
        self.done = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            for user in self.users:
                event = self.harness.add_event(
                    self.source, user, OUTAGE_GROUP, LOOKUP_ADD_EVENT_TYPE
                )
                while not self.stop.is_set():
                    try:
                        publish_raw(self.harness.redis, event)
                        break
                    except redis.RedisError:
                        # A producer cannot know whether the entry was added before the error:
                        # it sends it again, and the scheduler drops the duplicate by its id.
                        self.retries += 1
                        self.stop.wait(PRODUCER_RETRY_S)
                else:
                    return
                self.published.append(str(user))
                self.stop.wait(self.interval_s)
        finally:
            self.done.set()
