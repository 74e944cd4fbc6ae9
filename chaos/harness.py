"""What every scenario drives and checks: events and batches in, runs, rows and memberships out."""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis
from sqlalchemy import func
from sqlmodel import col, select

from harness.stack import LocalStack
from harness.waiting import poll_until
from models.audit import AuditEntry
from models.batches import FINAL_BATCH_STATUSES, BatchItem, ItemAction, NewItem, get_batch
from models.db import session_scope
from models.runs import FINAL_RUN_STATUSES, FlowRun, RunStatus
from sandbox.app import SandboxApp
from sandbox.directory import bulk_user_id
from scheduler.batches import submit_batch
from scheduler.producer import build_event, publish_raw

# The flows the scenarios trigger; applied once when the stack is up.
FLOWS_DIR = Path(__file__).resolve().parent / "flows"
ADD_EVENT_TYPE = "chaos.member.add"
# Triggers `chaos-gated`, whose trigger.if divides by `event.data.divisor`.
GATED_EVENT_TYPE = "chaos.member.gated"
# Triggers `chaos-lookup-add`: two steps, so a chain must go on across a fault.
LOOKUP_ADD_EVENT_TYPE = "chaos.member.lookup-add"
# How often a scenario looks at the database while it waits for the work to end.
POLL_INTERVAL_S = 0.5
# Outcomes that mean a row or step did what it was asked (the second after an ambiguous write).
ADDED_OUTCOMES = frozenset({"added", "already_member"})


@dataclass(frozen=True)
class Sizes:
    """How much work a run of the suite asks for, and how long each part may take.

    A scenario module may size its own work by `short` (the CI-sized form) instead.
    """

    short: bool
    runs: int
    rows: int
    events: int
    fault_s: float  # how long an injected fault stays active
    timeout_s: float  # how long one scenario may take to reach its final state
    seed: int = 7


FULL = Sizes(short=False, runs=500, rows=2000, events=10_000, fault_s=60.0, timeout_s=1800.0)
SHORT = Sizes(short=True, runs=30, rows=100, events=300, fault_s=8.0, timeout_s=90.0)


@dataclass
class Result:
    """One line of the table: what a scenario asked, what happened, and what went wrong."""

    scenario: str
    asked: str
    happened: str
    lost: int
    duplicated: int
    early_retries: int
    elapsed_s: float
    processes_died: int = 0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.early_retries or self.processes_died)


@dataclass
class CheckedResult(Result):
    """A result that also fails on checks that are no loss: a bound exceeded, a stop missed."""

    failed_checks: int = 0

    @property
    def ok(self) -> bool:
        return super().ok and not self.failed_checks


@dataclass
class Tally:
    """Losses and duplicates a scenario found, with a note on each kind."""

    lost: int = 0
    duplicated: int = 0
    notes: list[str] = field(default_factory=list)

    def lose(self, count: int, note: str) -> None:
        if count:
            self.lost += count
            self.notes.append(f"{count} {note}")

    def duplicate(self, count: int, note: str) -> None:
        if count:
            self.duplicated += count
            self.notes.append(f"{count} {note}")


class Harness:
    """One running stack, seen from outside: publishes, submits, waits and checks."""

    def __init__(self, stack: LocalStack, bulk_users: int) -> None:
        self.stack = stack
        self.redis = redis.Redis.from_url(stack.redis_url or "")
        self.database_url = stack.settings.resolved_database_url
        self._bulk_users = bulk_users
        self._next_user = 1

    @property
    def sandbox(self) -> SandboxApp:
        return self.stack.sandbox.app

    def early_retries(self) -> int:
        return int(self.sandbox.stats()["early_retries"])

    def processes_died(self) -> int:
        processes = [*self.stack.worker_processes, *self.stack.scheduler_processes]
        return sum(process.poll() is not None for process in processes)

    def users(self, count: int) -> list[int]:
        """Bulk user numbers no other scenario has used, so memberships compare exactly."""
        first = self._next_user
        self._next_user += count
        if self._next_user - 1 > self._bulk_users:
            raise RuntimeError(f"the sandbox seeds {self._bulk_users} bulk users, not enough")
        return list(range(first, self._next_user))

    def members(self, group_id: str) -> set[str]:
        return set(self.sandbox.directory.members(group_id))

    def add_event(
        self, source: str, user: int, group_id: str, event_type: str = ADD_EVENT_TYPE
    ) -> str:
        """An event of `chaos-add` (or of the flow `event_type` triggers) for bulk user `user`."""
        event = build_event(
            type=event_type,
            source=source,
            id=str(user),
            data={"user_id": bulk_user_id(user), "group_id": group_id},
        )
        return json.dumps(event)

    def publish_adds(
        self,
        source: str,
        users: Iterable[int],
        group_id: str,
        event_type: str = ADD_EVENT_TYPE,
    ) -> list[str]:
        """One `chaos-add` event (or `event_type`) per user; returns the event ids."""
        ids = []
        for user in users:
            publish_raw(self.redis, self.add_event(source, user, group_id, event_type))
            ids.append(str(user))
        return ids

    def submit_adds(self, source: str, users: Sequence[int], group_id: str) -> str:
        items = [
            NewItem(line, ItemAction.ADD, bulk_user_id(user), group_id)
            for line, user in enumerate(users, start=1)
        ]
        return submit_batch(self.stack.settings, source, items)

    def runs(self, source: str) -> list[tuple[str, str, RunStatus]]:
        """(event id, run id, status) of every run of events from `source`."""
        with session_scope(self.database_url) as session:
            rows = session.exec(
                select(FlowRun.event_id, FlowRun.id, FlowRun.status).where(
                    FlowRun.event_source == source
                )
            ).all()
        return [(event_id or "", run_id, RunStatus(status)) for event_id, run_id, status in rows]

    def runs_final(self, source: str, expected: int) -> bool:
        runs = self.runs(source)
        return len(runs) >= expected and all(s in FINAL_RUN_STATUSES for _, _, s in runs)

    def batch_final(self, batch_id: str) -> bool:
        batch = get_batch(self.database_url, batch_id)
        return batch is not None and batch.status in FINAL_BATCH_STATUSES

    def check_runs(self, source: str, event_ids: Sequence[str], tally: Tally) -> None:
        """One succeeded run per event, its add step audited once."""
        runs = self.runs(source)
        per_event = Counter(event_id for event_id, _, _ in runs)
        succeeded = {e for e, _, s in runs if s == RunStatus.SUCCEEDED}
        tally.lose(sum(e not in per_event for e in event_ids), "events without a run")
        tally.lose(sum(e in per_event and e not in succeeded for e in event_ids), "runs not ok")
        failed = [run_id for _, run_id, s in runs if s == RunStatus.FAILED]
        if failed:
            tally.notes.append(f"first failed run {failed[0]}: {self._run_error(failed[0])}")
        tally.duplicate(sum(n - 1 for n in per_event.values()), "extra runs")
        tally.duplicate(len(per_event.keys() - set(event_ids)), "runs of events not asked")
        run_ids = [run_id for _, run_id, _ in runs]
        tally.duplicate(
            self.audit_repeats(col(AuditEntry.run_id).in_(run_ids), AuditEntry.run_id),
            "steps audited twice",
        )

    def _run_error(self, run_id: str) -> str | None:
        with session_scope(self.database_url) as session:
            run = session.get(FlowRun, run_id)
            return run.error if run is not None else None

    def check_batch(self, batch_id: str, rows: int, tally: Tally) -> None:
        """Every row with one successful outcome, audited once."""
        with session_scope(self.database_url) as session:
            outcomes = session.exec(
                select(BatchItem.outcome).where(BatchItem.batch_id == batch_id)
            ).all()
        tally.lose(rows - len(outcomes), "rows missing")
        tally.lose(sum(o not in ADDED_OUTCOMES for o in outcomes), "rows without success")
        tally.duplicate(
            self.audit_repeats(AuditEntry.batch_id == batch_id, AuditEntry.batch_row),
            "rows audited twice",
        )

    def check_members(
        self, group_id: str, before: set[str], users: Iterable[int], tally: Tally
    ) -> None:
        """The group holds what it held plus exactly the users asked."""
        asked = {bulk_user_id(user) for user in users}
        after = self.members(group_id)
        tally.lose(len(asked - after), "memberships missing")
        tally.duplicate(len(after - asked - before), "memberships not asked")
        tally.lose(len(before - after), "memberships removed")

    def audit_repeats(self, where: object, key: object) -> int:
        """How many audit entries repeat an earlier one's (key, step): a change reported twice."""
        with session_scope(self.database_url) as session:
            counts = session.exec(
                select(func.count())
                .where(where)  # type: ignore[arg-type]
                .group_by(key, AuditEntry.step_id)  # type: ignore[arg-type]
            ).all()
        return sum(count - 1 for count in counts)


@dataclass(frozen=True)
class Scenario:
    """One entry of the suite: a module under `chaos/` lists its own in `SCENARIOS`."""

    name: str  # what `--only` takes
    number: int  # the scenario's number in issue 7; the suite runs them in this order
    run: Callable[[Harness, Sizes], list[Result]]
    # Bulk users of the sandbox the scenario adds to groups (see `Harness.users`).
    users_needed: Callable[[Sizes], int] = lambda sizes: 0


def measured(harness: Harness, name: str, asked: str, body: Callable[[Tally], str]) -> Result:
    """Run one scenario body; its result with the time taken and the early retries it caused."""
    early_before = harness.early_retries()
    started = time.monotonic()
    tally = Tally()
    try:
        happened = body(tally)
    finally:
        harness.sandbox.clear_faults()
    elapsed_s = time.monotonic() - started
    died = harness.processes_died()
    if died:
        tally.notes.append(f"{died} processes died")
    return Result(
        scenario=name,
        asked=asked,
        happened="; ".join([happened, *tally.notes]),
        lost=tally.lost,
        duplicated=tally.duplicated,
        early_retries=harness.early_retries() - early_before,
        elapsed_s=elapsed_s,
        processes_died=died,
    )


def checked(
    harness: Harness, name: str, asked: str, body: Callable[[Tally, list[str]], str]
) -> CheckedResult:
    """`measured`, failing also on checks that are no loss; `body` lists the ones that failed."""
    failed: list[str] = []
    result = measured(harness, name, asked, lambda tally: body(tally, failed))
    return CheckedResult(**dataclasses.asdict(result), failed_checks=len(failed))


def fail_check(tally: Tally, failed: list[str], note: str) -> None:
    """Record a check that failed, for `checked` to count and the table to show."""
    failed.append(note)
    tally.notes.append(f"FAILED: {note}")


def wait_for(done: Callable[[], bool], deadline: float) -> bool:
    """Whether `done` held before `deadline` (monotonic), looking at the database's pace."""
    return bool(poll_until(done, deadline, poll_s=POLL_INTERVAL_S))
