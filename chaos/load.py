"""Issue 7, scenario 9: events pushed as fast as Redis takes them; memory stays bounded.

Every event adds its own bulk user to one group. The events go in by pipelined XADDs, as fast
as one producer can; meanwhile the resident memory of every process of the stack (the worker
and its pool children, the scheduler, the embedded redis-server, and this process, which holds
the sandbox) is sampled from /proc once a second. The scenario fails when a process passes its
bound, or when one that should stay flat still grew in the second half of the work; and, as
every scenario, when an event has no run, or two, or its run did not succeed, or the group does
not hold exactly the users asked.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import func
from sqlmodel import col, select

from chaos.harness import Harness, Result, Scenario, Sizes, Tally, checked, fail_check, wait_for
from entraflow import keys, process_info
from entraflow.redis_server import PID_FILE, EmbeddedRedis
from models.db import session_scope
from models.runs import FINAL_RUN_STATUSES, FlowRun, RunStatus
from sandbox.directory import DEMO_GROUPS
from scheduler.producer import EVENT_FIELD

SOURCE = "chaos/load"
WARMUP_SOURCE = "chaos/load/warmup"
GROUP = DEMO_GROUPS["sales"].id
# Events sent per pipeline (one round trip to Redis).
PUBLISH_PIPELINE = 1000
# Events asked in the full form (issue 7) and in the CI-sized one.
FULL_EVENTS = 50_000
SHORT_EVENTS = 2_000
# Events run to the end before the flood and its measurement: a process's first runs fill its
# lazy imports and caches, which is no growth with the load.
WARMUP_EVENTS = 100
# The slowest rate, in finished runs per second, at which the work still counts as going on:
# the scenario gives up after events / this. Graph's write budget allows 20 per second.
MIN_RUNS_PER_S = 10.0
# How often memory is sampled and the database is polled, in seconds.
SAMPLE_INTERVAL_S = 1.0
POLL_INTERVAL_S = 2.0
MIB = 1024 * 1024

# The process kinds sampled, and the bounds of each, in MiB.
WORKER, CHILD, SCHEDULER, REDIS, CHAOS = "worker", "worker child", "scheduler", "redis", "chaos"
KINDS = (WORKER, CHILD, SCHEDULER, REDIS, CHAOS)
# Largest resident size of one process of the kind, for any number of events: these hold no
# more per event than the one they are working on. An idle one is about 115 MiB; a process
# that keeps sending steps back to wait for the Graph budget levels off near 240 MiB (each
# retry's traceback copy leaves the allocator's arenas fragmented). The default worker runs
# every task in its main process, on threads: the whole worker within 300 MiB (issue 11).
FLAT_PEAK_MIB = {WORKER: 300.0, CHILD: 320.0, SCHEDULER: 250.0}
# Largest growth of a flat kind (see `MemorySamples.growth_mib`), above the +-10 MiB a worker
# child swings by between retries: a child leaking 2 KiB per run (it runs half of 50,000) shows
# about this much.
FLAT_GROWTH_MIB = 24.0
# The default worker's one process runs 32 threads, whose allocations spread over more malloc
# arenas as more of them are busy at once: seen growing up to 57 MiB in a 2,000-event short form
# (and +0 in another); a leak of 2 KiB per run shows in the full form's 50,000 events.
WORKER_GROWTH_MIB = 80.0
# Redis holds every event not yet trimmed (the stream keeps ENTRAFLOW_EVENTS_MAX_LEN) and every
# queued step message; this process holds the sandbox's directory, which gains a membership per
# event. Their bound grows with the events: a base plus an allowance per event, in KiB.
GROWING_BASE_MIB = {REDIS: 64.0, CHAOS: 400.0}
GROWING_KIB_PER_EVENT = {REDIS: 4.0, CHAOS: 4.0}


@dataclass
class MemorySamples:
    """Resident sizes per kind over time: each sample keeps the largest process of the kind."""

    times: list[float] = dataclasses.field(default_factory=list)
    peaks: dict[str, list[float]] = dataclasses.field(default_factory=lambda: defaultdict(list))

    def add(self, at: float, sizes: dict[str, float]) -> None:
        self.times.append(at)
        for kind in KINDS:
            self.peaks[kind].append(sizes.get(kind, 0.0))

    def peak_mib(self, kind: str) -> float:
        return max(self.peaks[kind], default=0.0)

    def growth_mib(self, kind: str) -> float:
        """The peak of the last quarter of the samples over the peak of the first half.

        A process that fills its caches and its allocator's arenas early levels off in the
        first half and shows no growth; one that leaks shows half of what it leaked.
        """
        values = self.peaks[kind]
        if len(values) < 2:
            return 0.0
        return max(values[-max(1, len(values) // 4) :]) - max(values[: len(values) // 2])


def load(harness: Harness, sizes: Sizes) -> list[Result]:
    """Scenario 9: a flood of events; memory of every process bounded, nothing lost."""
    events = SHORT_EVENTS if sizes.short else FULL_EVENTS
    return [
        checked(
            harness,
            "load",
            f"{events} events pushed at once",
            lambda tally, failed: _load(harness, events, tally, failed),
        )
    ]


def users_needed(sizes: Sizes) -> int:
    return WARMUP_EVENTS + (SHORT_EVENTS if sizes.short else FULL_EVENTS)


SCENARIOS = [Scenario("load", 9, load, users_needed)]


def _load(harness: Harness, events: int, tally: Tally, failed: list[str]) -> str:
    warmup_users = harness.users(WARMUP_EVENTS)
    harness.publish_adds(WARMUP_SOURCE, warmup_users, GROUP)
    if not wait_for(
        lambda: harness.runs_final(WARMUP_SOURCE, WARMUP_EVENTS),
        time.monotonic() + WARMUP_EVENTS / MIN_RUNS_PER_S,
    ):
        fail_check(tally, failed, "the warm-up runs did not finish")
    users = harness.users(events)
    before = harness.members(GROUP)
    samples = MemorySamples()
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(harness, samples, stop), daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        event_ids = _publish(harness, users)
        published_s = time.monotonic() - started
        scheduled_s, finished_s = _wait(harness, events, started + events / MIN_RUNS_PER_S)
    finally:
        stop.set()
        sampler.join()
    harness.check_runs(SOURCE, event_ids, tally)
    harness.check_members(GROUP, before, users, tally)
    memory = _check_memory(samples, events, tally, failed)
    state = "all final" if finished_s is not None else "NOT FINAL"
    rates = (
        f"pushed {events / published_s:,.0f}/s, scheduled {_rate(events, scheduled_s)}, "
        f"finished {_rate(events, finished_s)}"
    )
    return f"{state}; {rates}; {memory}"


def _publish(harness: Harness, users: list[int]) -> list[str]:
    """One event per user, by pipelined XADDs; the event ids."""
    for start in range(0, len(users), PUBLISH_PIPELINE):
        pipe = harness.redis.pipeline(transaction=False)
        for user in users[start : start + PUBLISH_PIPELINE]:
            pipe.xadd(keys.EVENTS_STREAM, {EVENT_FIELD: harness.add_event(SOURCE, user, GROUP)})
        pipe.execute()
    return [str(user) for user in users]


def _wait(harness: Harness, events: int, deadline: float) -> tuple[float | None, float | None]:
    """Seconds until every event had its run, and until every run was final (None: never)."""
    started = time.monotonic()
    scheduled_s = finished_s = None
    while time.monotonic() < deadline:
        counts = _run_counts(harness)
        if scheduled_s is None and sum(counts.values()) >= events:
            scheduled_s = time.monotonic() - started
        if sum(n for status, n in counts.items() if status in FINAL_RUN_STATUSES) >= events:
            finished_s = time.monotonic() - started
            break
        time.sleep(POLL_INTERVAL_S)
    return scheduled_s, finished_s


def _run_counts(harness: Harness) -> dict[RunStatus, int]:
    with session_scope(harness.database_url) as session:
        rows = session.exec(
            select(FlowRun.status, func.count())
            .where(FlowRun.event_source == SOURCE)
            .group_by(col(FlowRun.status))
        ).all()
    return {RunStatus(status): int(count) for status, count in rows}


def _rate(events: int, seconds: float | None) -> str:
    return "never" if not seconds else f"{events / seconds:,.1f}/s"


# --- memory ---


def _sample(harness: Harness, samples: MemorySamples, stop: threading.Event) -> None:
    started = time.monotonic()
    while True:
        samples.add(time.monotonic() - started, _resident_mib(harness))
        if stop.wait(SAMPLE_INTERVAL_S):
            return


def _resident_mib(harness: Harness) -> dict[str, float]:
    """The largest resident size of each kind of process of the stack, now."""
    stack = harness.stack
    indexes = range(len(stack.worker_processes))
    pids: dict[str, list[int]] = {
        WORKER: [process.pid for process in stack.worker_processes],
        CHILD: [pid for index in indexes for pid in stack.worker_children(index)],
        SCHEDULER: [process.pid for process in stack.scheduler_processes],
        REDIS: _redis_pid(harness),
        CHAOS: [os.getpid()],
    }
    sizes = {}
    for kind, kind_pids in pids.items():
        resident = [
            size for size in map(process_info.resident_bytes, kind_pids) if size is not None
        ]
        sizes[kind] = max(resident, default=0) / MIB
    return sizes


def _redis_pid(harness: Harness) -> list[int]:
    """The embedded redis-server's pid, from the pid file it writes."""
    folder = EmbeddedRedis.for_settings(harness.stack.settings).folder
    try:
        return [int((folder / PID_FILE).read_text().strip())]
    except (FileNotFoundError, ValueError):
        return []  # a Redis the stack did not start is not ours to measure


def _check_memory(samples: MemorySamples, events: int, tally: Tally, failed: list[str]) -> str:
    """Each kind's peak and growth against its bound; the summary for the table."""
    bounds = {
        **FLAT_PEAK_MIB,
        **{
            kind: base + GROWING_KIB_PER_EVENT[kind] * events / 1024
            for kind, base in GROWING_BASE_MIB.items()
        },
    }
    for kind in KINDS:
        peak = samples.peak_mib(kind)
        if peak > bounds[kind]:
            fail_check(
                tally, failed, f"{kind} peaked at {peak:.0f} MiB, over {bounds[kind]:.0f} MiB"
            )
        growth = samples.growth_mib(kind)
        bound = WORKER_GROWTH_MIB if kind == WORKER else FLAT_GROWTH_MIB
        if kind in FLAT_PEAK_MIB and growth > bound:
            fail_check(tally, failed, f"{kind} grew {growth:.0f} MiB, over {bound:g} MiB")
    shown = ", ".join(
        f"{kind} {samples.peak_mib(kind):.0f} ({samples.growth_mib(kind):+.0f})" for kind in KINDS
    )
    return f"peak MiB (growth in the second half): {shown}; {len(samples.times)} samples"
