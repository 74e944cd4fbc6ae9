"""Issue 7, scenarios 1 and 2: workers and schedulers killed with SIGKILL while work is in flight.

A worker dies as a container does, its main process and pool processes at once, and is started
again in its place; what it held comes back after the visibility timeout (kombu restores the
unacknowledged messages, and a step's lock lapses with them). What it had taken off the queue
without noting it held comes back through the scheduler's housekeeping (`scheduler.runs`). A
scheduler dies the same way: it comes back as the same consumer and reads its own pending events
first, or it stays dead and a second scheduler claims what it held once idle long enough.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis
from sqlalchemy import func
from sqlalchemy.orm import aliased
from sqlmodel import col, select

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
from models.batches import BatchItem
from models.db import session_scope
from models.runs import FINAL_RUN_STATUSES, FlowRun, StepRun, StepStatus
from sandbox.directory import DEMO_GROUPS

# The group every kill scenario adds to; each uses users of its own, so checks stay exact.
KILL_GROUP = DEMO_GROUPS["sales"].id
# The stack's one worker and its first scheduler.
WORKER = 0
SCHEDULER = 0


@dataclass(frozen=True)
class KillSizes:
    """How much work the kill scenarios ask for, and how often they kill."""

    kills: int  # worker kills during the runs, as many during the batch; scheduler kills
    runs: int
    rows: int
    events: int  # events of each scheduler scenario
    events_per_s: float  # how fast they arrive
    timeout_s: float  # how long the work may take to end after the last kill


FULL_KILLS = KillSizes(
    kills=5, runs=500, rows=5000, events=3000, events_per_s=50.0, timeout_s=1800.0
)
SHORT_KILLS = KillSizes(kills=2, runs=40, rows=300, events=300, events_per_s=30.0, timeout_s=240.0)

# Graph's answer takes this long while workers are killed: about a tenant's write latency, so a
# kill at a random moment mostly finds a request in flight, and a short batch outlives its kills.
GRAPH_LATENCY_S = 0.25
# A worker kill lands once a share of its workload drawn from these bounds has been started,
# so there is always work in flight and work still to come.
KILL_SHARE_MIN = 0.05
KILL_SHARE_MAX = 0.8
# A mid-request kill holds the answer to one write Graph applied this long, and kills meanwhile.
HOLD_ANSWER_S = 3.0
# How long a mid-request kill waits for a write to hold before it kills anyway.
HOLD_WAIT_S = 10.0
# A killed process stays down for up to this long before it is started again.
MAX_DOWNTIME_S = 1.0
# How often the kill loops look at progress, and at what a scheduler holds.
PROGRESS_POLL_S = 0.1
HELD_POLL_S = 0.002
# A holding kill waits this long at most for the scheduler to hold unacknowledged events.
HELD_WAIT_S = 10.0
# Scheduler kills land within this share of the arrival window, so events arrive after each.
ARRIVAL_SHARE_MIN = 0.1
ARRIVAL_SHARE_MAX = 0.8
# The second scheduler takes over a dead one's events idle this long (default 60 s): the
# takeover is what is checked, not its patience.
TAKEOVER_IDLE_S = 5.0
# Pending entries read per look at one consumer's share of the group.
PENDING_PAGE = 1000


class Workload(StrEnum):
    """What a worker kill is timed against."""

    RUNS = "runs"
    BATCH = "batch"


class WorkerKill(StrEnum):
    """Where a worker kill lands."""

    MID_REQUEST = "mid-request"  # whole worker, while Graph holds the answer to an applied write
    # Whole worker, just after it took a message off the queue and before it noted holding it:
    # kombu's Redis transport leaves that window open, and the message goes with the worker.
    # Seen by chance once; here the message is taken for it, so each run meets the window.
    TAKING = "taking a message"
    ANYWHERE = "anywhere"  # whole worker, the moment its target share is reached
    POOL_PROCESS = "pool process"  # one prefork pool process: Celery requeues its message at once


class SchedulerKill(StrEnum):
    """When a scheduler kill lands."""

    HOLDING = "holding"  # while it holds events it has read and not acknowledged
    ANYWHERE = "anywhere"


# The queue of each workload's messages.
QUEUES = {Workload.RUNS: keys.FLOWS_QUEUE, Workload.BATCH: keys.BULK_QUEUE}
# The write each workload sends: a flow step's POST .../members/$ref, a chunk's PATCH.
WRITE_REQUESTS = {
    Workload.RUNS: ("POST", r"/members/\$ref$"),
    Workload.BATCH: ("PATCH", r"^/v1\.0/groups/[^/]+$"),
}
# How a mid-request kill names the write whose answer it held.
HELD_WRITES = {Workload.RUNS: "a step's POST", Workload.BATCH: "a chunk's PATCH"}


def kill_sizes(sizes: Sizes) -> KillSizes:
    return SHORT_KILLS if sizes.short else FULL_KILLS


def worker_kill(harness: Harness, sizes: Sizes) -> list[Result]:
    """Issue 7, scenario 1: the worker SIGKILLed at random points of a run stream and a batch."""
    kill = kill_sizes(sizes)
    asked = (
        f"{kill.runs} runs + {kill.rows} rows, worker SIGKILLed {kill.kills}x during each, "
        f"Graph latency {GRAPH_LATENCY_S:g}s"
    )
    return [
        measured(
            harness, "worker kill", asked, lambda tally: _worker_kills(harness, sizes, kill, tally)
        )
    ]


def scheduler_kill(harness: Harness, sizes: Sizes) -> list[Result]:
    """Issue 7, scenario 2: the scheduler SIGKILLed as events arrive; then one of two."""
    kill = kill_sizes(sizes)
    arriving = f"{kill.events} events at {kill.events_per_s:g}/s"
    return [
        measured(
            harness,
            "scheduler kill",
            f"{arriving}, scheduler SIGKILLed {kill.kills}x, restarted",
            lambda tally: _scheduler_kills(harness, sizes, kill, tally),
        ),
        measured(
            harness,
            "two schedulers, one killed",
            f"{arriving}, 2 schedulers, one SIGKILLed for good",
            lambda tally: _one_of_two_killed(harness, sizes, kill, tally),
        ),
    ]


SCENARIOS = [
    Scenario(
        "worker-kill",
        1,
        worker_kill,
        lambda sizes: kill_sizes(sizes).runs + kill_sizes(sizes).rows,
    ),
    Scenario("scheduler-kill", 2, scheduler_kill, lambda sizes: 2 * kill_sizes(sizes).events),
]


# --- scenario 1: the worker ---

# The runs of the worker scenario are `chaos-lookup-add` (chaos/flows): a lookup, then the add it
# feeds, so a kill can also land between two steps.
FIRST_STEP, LAST_STEP = "user", "add"
STEPS_PER_RUN = 2


@dataclass(frozen=True)
class Progress:
    """How far the runs and the batch of a worker scenario have come."""

    started: dict[Workload, int]  # steps of the runs, and rows, tried at least once
    done: int  # runs and rows that ended
    between_steps: int  # runs whose first step is done and whose second has not started


@dataclass(frozen=True)
class KillDone:
    """One worker kill: how it landed, the workload whose target it was, and how far that was."""

    how: str
    workload: Workload
    share: float  # of the workload started
    progress: Progress


def _progress(harness: Harness, source: str, batch_id: str) -> Progress:
    first, last = aliased(StepRun), aliased(StepRun)
    with session_scope(harness.database_url) as session:
        runs = session.exec(
            select(FlowRun.status, func.count())
            .where(FlowRun.event_source == source)
            .group_by(col(FlowRun.status))
        ).all()
        rows = session.exec(
            select(col(BatchItem.outcome).is_not(None), func.count())
            .where(BatchItem.batch_id == batch_id)
            .where(col(BatchItem.attempts) > 0)
            .group_by(col(BatchItem.outcome).is_not(None))
        ).all()
        between_steps = session.exec(
            select(func.count())
            .select_from(FlowRun)
            .join(first, col(first.run_id) == FlowRun.id)
            .join(last, col(last.run_id) == FlowRun.id)
            .where(FlowRun.event_source == source)
            .where(first.step_id == FIRST_STEP, first.status == StepStatus.SUCCEEDED)
            .where(last.step_id == LAST_STEP, last.status == StepStatus.QUEUED)
        ).one()
        steps_started = session.exec(
            select(func.count())
            .select_from(StepRun)
            .join(FlowRun, col(FlowRun.id) == StepRun.run_id)
            .where(FlowRun.event_source == source)
            .where(col(StepRun.attempts) > 0)
        ).one()
    runs_done = sum(n for status, n in runs if status in FINAL_RUN_STATUSES)
    rows_done = sum(n for ended, n in rows if ended)
    started = {Workload.RUNS: steps_started, Workload.BATCH: sum(n for _, n in rows)}
    return Progress(started, runs_done + rows_done, between_steps)


def _worker_kills(harness: Harness, sizes: Sizes, kill: KillSizes, tally: Tally) -> str:
    """Publish runs and submit a batch, kill the worker as each reaches its targets, check."""
    source = "chaos/worker-kill"
    rng = random.Random(sizes.seed)
    run_users = harness.users(kill.runs)
    row_users = harness.users(kill.rows)
    totals = {Workload.RUNS: kill.runs * STEPS_PER_RUN, Workload.BATCH: kill.rows}
    targets = {
        workload: sorted(rng.uniform(KILL_SHARE_MIN, KILL_SHARE_MAX) for _ in range(kill.kills))
        for workload in Workload
    }
    # Every kind of kill the worker's pool has, about as often as each other, in a seeded order.
    # A threads pool (the default) has no pool process to kill on its own.
    prefork = harness.stack.pool == "prefork"
    possible = [k for k in WorkerKill if k is not WorkerKill.POOL_PROCESS or prefork]
    kinds = [possible[n % len(possible)] for n in range(kill.kills * len(Workload))]
    rng.shuffle(kinds)
    before = harness.members(KILL_GROUP)
    latency_before = harness.sandbox.config.latency_s
    harness.sandbox.configure(latency_s=GRAPH_LATENCY_S)
    kills: list[KillDone] = []
    try:
        event_ids = harness.publish_adds(source, run_users, KILL_GROUP, LOOKUP_ADD_EVENT_TYPE)
        batch_id = harness.submit_adds(source, row_users, KILL_GROUP)
        started = last_kill = time.monotonic()
        done_at_last_kill = -1
        while any(targets.values()) and time.monotonic() < started + kill.timeout_s:
            progress = _progress(harness, source, batch_id)
            due = [
                workload
                for workload in Workload
                if targets[workload]
                and progress.started[workload] >= targets[workload][0] * totals[workload]
            ]
            # A restarted worker must have done something before it is killed again.
            if not due or progress.done <= done_at_last_kill:
                time.sleep(PROGRESS_POLL_S)
                continue
            workload = due[0]
            targets[workload].pop(0)
            how = _kill_worker(harness, rng, kinds.pop(), workload)
            kills.append(
                KillDone(how, workload, progress.started[workload] / totals[workload], progress)
            )
            last_kill = time.monotonic()
            done_at_last_kill = _progress(harness, source, batch_id).done
        finished = wait_for(
            lambda: harness.runs_final(source, len(event_ids)) and harness.batch_final(batch_id),
            last_kill + kill.timeout_s,
        )
        recovery_s = time.monotonic() - last_kill
    finally:
        harness.sandbox.configure(latency_s=latency_before)
    tally.lose(sum(len(left) for left in targets.values()), "kills not done (work too quick)")
    harness.check_runs(source, event_ids, tally)
    harness.check_batch(batch_id, kill.rows, tally)
    harness.check_members(KILL_GROUP, before, [*run_users, *row_users], tally)
    state = "all final" if finished else "NOT FINAL"
    return f"{_summary(kills)}; {state} {recovery_s:.0f}s after the last kill"


def _summary(kills: Sequence[KillDone]) -> str:
    """The kills in a few words: how many of each kind, where they landed."""
    kinds = Counter(kill.how for kill in kills)
    parts = [", ".join(f"{count} {how}" for how, count in sorted(kinds.items()))]
    for workload in Workload:
        shares = [f"{kill.share:.0%}" for kill in kills if kill.workload is workload]
        parts.append(f"{len(shares)} during the {workload} (at {' '.join(shares)} started)")
    between = max((kill.progress.between_steps for kill in kills), default=0)
    parts.append(f"up to {between} runs between steps at a kill")
    return f"{len(kills)} kills: {'; '.join(parts)}"


def _kill_worker(harness: Harness, rng: random.Random, kind: WorkerKill, workload: Workload) -> str:
    """Kill the worker (or one pool process) as `kind` says; start it again; say what was done."""
    stack = harness.stack
    if kind is WorkerKill.POOL_PROCESS:
        children = stack.worker_children(WORKER)
        if children:
            stack.kill_worker_child(WORKER, rng.choice(children))
            return kind.value
        kind = WorkerKill.ANYWHERE  # no pool yet: the worker is still starting
    done = kind.value
    if kind is WorkerKill.MID_REQUEST:
        done = _kill_mid_request(harness)
    elif kind is WorkerKill.TAKING:
        # The end of the list is where the worker's BRPOP takes the next message from.
        if harness.redis.rpop(QUEUES[workload]) is None:
            done = f"{kind} (none waiting)"
        stack.kill_worker(WORKER)
    else:
        stack.kill_worker(WORKER)
    time.sleep(rng.uniform(0, MAX_DOWNTIME_S))
    stack.restart_worker(WORKER)
    return done


def _kill_mid_request(harness: Harness) -> str:
    """Hold the answer to the next membership write Graph applies, and kill the worker meanwhile."""
    rules = {
        workload: harness.sandbox.add_fault(path, method=method, delay_s=HOLD_ANSWER_S, count=1)
        for workload, (method, path) in WRITE_REQUESTS.items()
    }
    wait_for(lambda: any(rule.hits for rule in rules.values()), time.monotonic() + HOLD_WAIT_S)
    harness.stack.kill_worker(WORKER)
    # A rule that has not hit yet must not hold a write of the restarted worker.
    harness.sandbox.clear_faults()
    held = [workload for workload, rule in rules.items() if rule.hits]
    if not held:
        return f"{WorkerKill.MID_REQUEST} (no write in flight)"
    return f"{WorkerKill.MID_REQUEST} ({' and '.join(HELD_WRITES[w] for w in held)} applied)"


# --- scenario 2: the scheduler ---


class Publisher:
    """Publishes one `chaos-add` event per user at a steady rate, from a thread of its own."""

    def __init__(
        self, harness: Harness, source: str, users: Sequence[int], events_per_s: float
    ) -> None:
        self.event_ids = [str(user) for user in users]
        self.window_s = len(users) / events_per_s
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._publish, args=(harness, source, users, events_per_s), daemon=True
        )

    def start(self) -> float:
        """Start publishing; the monotonic time it started."""
        started = time.monotonic()
        self._thread.start()
        return started

    def join(self) -> None:
        self._thread.join()

    def _publish(
        self, harness: Harness, source: str, users: Sequence[int], events_per_s: float
    ) -> None:
        started = time.monotonic()
        try:
            for n, user in enumerate(users):
                time.sleep(max(0.0, started + n / events_per_s - time.monotonic()))
                harness.publish_adds(source, [user], KILL_GROUP)
        except BaseException as exc:  # reported by the scenario, whatever it was
            self.errors.append(exc)


def held_by(client: redis.Redis, consumer: str) -> int:
    """How many events `consumer` has read and not acknowledged."""
    try:
        entries: Any = client.xpending_range(
            keys.EVENTS_STREAM, keys.SCHEDULERS_GROUP, "-", "+", PENDING_PAGE, consumername=consumer
        )
    except redis.ResponseError as exc:
        return _no_group(exc)
    return len(entries)


def pending(client: redis.Redis) -> int:
    """How many events the schedulers' group has read and not acknowledged."""
    try:
        summary: Any = client.xpending(keys.EVENTS_STREAM, keys.SCHEDULERS_GROUP)
    except redis.ResponseError as exc:
        return _no_group(exc)
    return int(summary["pending"])


def _no_group(exc: redis.ResponseError) -> int:
    # No group yet: the first scheduler is still starting, and nobody has read anything.
    if "NOGROUP" not in str(exc):
        raise exc
    return 0


def _kill_scheduler(harness: Harness, index: int, kind: SchedulerKill) -> int:
    """SIGKILL scheduler `index` as `kind` says; how many events it left pending."""
    consumer = harness.stack.scheduler_consumer(index)
    if kind is SchedulerKill.HOLDING:
        deadline = time.monotonic() + HELD_WAIT_S
        while not held_by(harness.redis, consumer) and time.monotonic() < deadline:
            time.sleep(HELD_POLL_S)
    harness.stack.kill_scheduler(index)
    return held_by(harness.redis, consumer)


def _scheduler_kills(harness: Harness, sizes: Sizes, kill: KillSizes, tally: Tally) -> str:
    """Kill the scheduler at seeded moments while events arrive; start it again as itself."""
    source = "chaos/scheduler-kill"
    rng = random.Random(sizes.seed)
    users = harness.users(kill.events)
    before = harness.members(KILL_GROUP)
    publisher = Publisher(harness, source, users, kill.events_per_s)
    moments = sorted(
        rng.uniform(ARRIVAL_SHARE_MIN, ARRIVAL_SHARE_MAX) * publisher.window_s
        for _ in range(kill.kills)
    )
    kinds = [list(SchedulerKill)[n % len(SchedulerKill)] for n in range(kill.kills)]
    rng.shuffle(kinds)
    kills = []
    started = last_kill = publisher.start()
    try:
        for moment, kind in zip(moments, kinds, strict=True):
            time.sleep(max(0.0, started + moment - time.monotonic()))
            held = _kill_scheduler(harness, SCHEDULER, kind)
            last_kill = time.monotonic()
            kills.append(f"{kind} ({held} held)")
            time.sleep(rng.uniform(0, MAX_DOWNTIME_S))
            harness.stack.restart_scheduler(SCHEDULER)
        publisher.join()
        finished = _wait_handled(harness, source, publisher, last_kill + kill.timeout_s)
        recovery_s = time.monotonic() - last_kill
    finally:
        _keep_scheduler(harness)
    _check_events(harness, source, publisher, users, before, tally)
    state = "all final" if finished else "NOT FINAL"
    return (
        f"{len(kills)} kills: {', '.join(kills)}, each restarted as the same consumer; "
        f"{state} {recovery_s:.0f}s after the last kill"
    )


def _one_of_two_killed(harness: Harness, sizes: Sizes, kill: KillSizes, tally: Tally) -> str:
    """Two schedulers share the stream; one dies for good and the other takes its events over."""
    source = "chaos/two-schedulers"
    rng = random.Random(sizes.seed + 1)
    users = harness.users(kill.events)
    before = harness.members(KILL_GROUP)
    publisher = Publisher(harness, source, users, kill.events_per_s)
    moment = rng.uniform(ARRIVAL_SHARE_MIN, ARRIVAL_SHARE_MAX) * publisher.window_s
    stack = harness.stack
    dead = stack.scheduler_consumer(SCHEDULER)
    second = len(stack.scheduler_processes)
    stack.start_scheduler({"ENTRAFLOW_EVENTS_CLAIM_IDLE_S": str(TAKEOVER_IDLE_S)})
    try:
        started = publisher.start()
        time.sleep(max(0.0, started + moment - time.monotonic()))
        held = _kill_scheduler(harness, SCHEDULER, SchedulerKill.HOLDING)
        killed_at = time.monotonic()
        taken_over = wait_for(lambda: not held_by(harness.redis, dead), killed_at + kill.timeout_s)
        takeover_s = time.monotonic() - killed_at
        publisher.join()
        finished = _wait_handled(harness, source, publisher, killed_at + kill.timeout_s)
    finally:
        _keep_scheduler(harness)
        stack.stop_scheduler(second)
    _check_events(harness, source, publisher, users, before, tally)
    state = "all final" if finished else "NOT FINAL"
    if not held:
        takeover = "nothing to take over"
    elif taken_over:
        takeover = f"taken over by the other in {takeover_s:.0f}s"
    else:
        takeover = "NEVER taken over"
    return f"scheduler {SCHEDULER} killed holding {held} events, {takeover}; {state}"


def _keep_scheduler(harness: Harness) -> None:
    """Leave the first scheduler running, as the stack was found."""
    if harness.stack.scheduler_processes[SCHEDULER].poll() is not None:
        harness.stack.restart_scheduler(SCHEDULER)


def _wait_handled(harness: Harness, source: str, publisher: Publisher, deadline: float) -> bool:
    """Wait until every event has its runs, every run has ended, and nothing is pending."""
    expected = len(publisher.event_ids)
    return wait_for(
        lambda: harness.runs_final(source, expected) and not pending(harness.redis), deadline
    )


def _check_events(
    harness: Harness,
    source: str,
    publisher: Publisher,
    users: Sequence[int],
    before: set[str],
    tally: Tally,
) -> None:
    if publisher.errors:
        tally.notes.append(f"publishing failed: {publisher.errors[0]!r}")
    tally.lose(pending(harness.redis), "events left pending")
    harness.check_runs(source, publisher.event_ids, tally)
    harness.check_members(KILL_GROUP, before, users, tally)
