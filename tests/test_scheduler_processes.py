"""The scheduler and workers as real processes, killed with SIGKILL during a stream of events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection
from sqlmodel import select

from entraflow import keys, process_info
from harness.stack import LocalStack
from harness.waiting import wait_until
from models.db import session_scope
from models.flows import AcceptedEvent, Flow
from models.runs import FlowRun
from sandbox.directory import DEMO_GROUPS, DEMO_USERS
from scheduler.flows import FlowDefinition
from scheduler.producer import publish_event

pytestmark = pytest.mark.integration

HIRED = "hr.employee.hired"
EVENTS = 30
# Every third event is a Sales hire and starts both flows; the others start only "lookup".
SALES_EVERY = 3
# Short, so the second scheduler takes over the first one's pending events quickly.
CLAIM_IDLE_S = 1.0
STOP_TIMEOUT_S = 15.0

FLOWS = [
    {
        "name": "lookup",
        "trigger": {"type": HIRED},
        "steps": [{"id": "user", "action": "lookup_user", "with": {"upn": "{{ event.data.upn }}"}}],
    },
    {
        "name": "sales-add",
        "trigger": {"type": HIRED, "if": "{{ event.data.department == 'Sales' }}"},
        "steps": [
            {"id": "user", "action": "lookup_user", "with": {"upn": "{{ event.data.upn }}"}},
            {
                "id": "add",
                "action": "add_user_to_group",
                "with": {"user_id": "{{ steps.user.id }}", "group_id": "{{ event.data.group_id }}"},
            },
        ],
    },
]
MALFORMED = {
    "not JSON": "{this is not json",
    "specversion must be '1.0'": json.dumps({"specversion": "0.3", "id": "m", "source": "s"}),
    "'data' must be a JSON object": json.dumps(
        {"specversion": "1.0", "id": "m", "source": "s", "type": HIRED, "data": [1]}
    ),
    # No department: the trigger.if of "sales-add" cannot be evaluated.
    "trigger.if": json.dumps(
        {"specversion": "1.0", "id": "m", "source": "s", "type": HIRED, "data": {}}
    ),
}


@pytest.fixture
def schedulers(
    stack: LocalStack, tmp_path: Path
) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """Start `entraflow scheduler` processes; kill whatever is left at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            **stack.env,
            "ENTRAFLOW_DATABASE_URL": stack.settings.resolved_database_url,
            "ENTRAFLOW_EVENTS_CLAIM_IDLE_S": str(CLAIM_IDLE_S),
        }
        with (tmp_path / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "cli", "scheduler", "--consumer", name],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def store_flows(database_url: str) -> None:
    with session_scope(database_url) as session:
        for flow in FLOWS:
            definition = FlowDefinition.model_validate(flow)
            session.add(
                Flow(
                    name=definition.name,
                    trigger_type=definition.trigger.type,
                    definition=definition.model_dump(by_alias=True),
                )
            )


def push(client: redis.Redis, n: int) -> None:
    department = "Sales" if n % SALES_EVERY == 0 else "HR"
    data = {"upn": DEMO_USERS["nestor"].upn, "group_id": DEMO_GROUPS["sales"].id}
    publish_event(
        client, type=HIRED, source="hr", id=f"hire-{n}", data={**data, "department": department}
    )
    time.sleep(0.02)  # a steady stream, so the kills land in the middle of it


def held_by(client: redis.Redis, consumer: str) -> int:
    """How many events `consumer` has read and not acknowledged."""
    try:
        entries: Any = client.xpending_range(
            keys.EVENTS_STREAM, keys.SCHEDULERS_GROUP, "-", "+", 100, consumername=consumer
        )
    except redis.ResponseError:  # no group yet: the scheduler is still starting
        return 0
    return len(entries)


def accepted_count(database_url: str) -> int:
    with session_scope(database_url) as session:
        return len(session.exec(select(AcceptedEvent)).all())


def kill_worker(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a worker and its pool processes, as a machine losing power would."""
    children = process_info.children(process.pid)
    process.kill()
    process.wait()
    for pid in children:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def expire_dead_worker_leases(client: redis.Redis, redis_url: str) -> None:
    """Do now what time would do for a dead worker: redeliver its messages, free its steps."""
    # The Redis transport redelivers unacknowledged messages after the visibility timeout
    # (5 minutes), and a step's lock outlives its dead holder by up to as long.
    with Connection(redis_url, transport_options={"visibility_timeout": 0}) as connection:
        connection.default_channel.qos.restore_visible(num=1000)
    for lock in client.scan_iter(match=keys.step_lock("*", "*")):
        client.delete(lock)


def test_sigkilled_scheduler_and_worker_lose_no_event_and_run_none_twice(
    stack: LocalStack,
    redis_client: redis.Redis,
    schedulers: Callable[[str], subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    database_url = stack.settings.resolved_database_url
    assert stack.redis_url is not None
    store_flows(database_url)
    malformed = iter(MALFORMED.values())

    for n in range(10):
        push(redis_client, n)
    publish_raw_unchecked(redis_client, next(malformed))
    first = schedulers("first")
    # Killed while it holds events it has read and not acknowledged, so the next must claim them.
    wait_until(lambda: held_by(redis_client, "first") > 0, "the first read", poll_s=0.002)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert held_by(redis_client, "first") > 0

    for n in [*range(10, 20), *range(5)]:  # the last five are duplicates
        push(redis_client, n)
    publish_raw_unchecked(redis_client, next(malformed))
    [worker] = stack.worker_processes
    kill_worker(worker)
    expire_dead_worker_leases(redis_client, stack.redis_url)
    stack.start_worker()
    second = schedulers("second")
    for n in range(20, EVENTS):
        push(redis_client, n)
    for raw in malformed:
        publish_raw_unchecked(redis_client, raw)

    state: dict[str, Any] = {}

    def everything_done() -> bool:
        summary: Any = redis_client.xpending(keys.EVENTS_STREAM, keys.SCHEDULERS_GROUP)
        with session_scope(database_url) as session:
            runs = session.exec(select(FlowRun)).all()
            unfinished = [run.status for run in runs if run.status not in ("succeeded", "failed")]
        state.update(
            accepted=accepted_count(database_url),
            dead=redis_client.xlen(keys.DEAD_EVENTS_STREAM),
            pending=summary["pending"],
            unfinished=unfinished,
        )
        return state == {
            "accepted": EVENTS, "dead": len(MALFORMED), "pending": 0, "unfinished": []
        }  # fmt: skip

    try:
        wait_until(everything_done, "every event handled and every run finished")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {state}\n{logs(tmp_path, stack)}") from exc
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=STOP_TIMEOUT_S) == 0, logs(tmp_path, stack)

    with session_scope(database_url) as session:
        runs = session.exec(select(FlowRun)).all()
        records = {record.event_id: record for record in session.exec(select(AcceptedEvent)).all()}
    for n in range(EVENTS):
        event_runs = [run for run in runs if run.event_id == f"hire-{n}"]
        expected = ["lookup", "sales-add"] if n % SALES_EVERY == 0 else ["lookup"]
        assert sorted(run.flow for run in event_runs) == expected, n
        assert set(records[f"hire-{n}"].run_ids) == {run.id for run in event_runs}
    assert len(runs) == EVENTS + len(range(0, EVENTS, SALES_EVERY))
    assert {run.status for run in runs} == {"succeeded"}, [run.error for run in runs]
    letters: Any = redis_client.xrange(keys.DEAD_EVENTS_STREAM)
    reasons = sorted(fields[b"reason"].decode() for _, fields in letters)
    for expected_reason in MALFORMED:
        assert sum(expected_reason in reason for reason in reasons) == 1, reasons


def logs(tmp_path: Path, stack: LocalStack) -> str:
    paths = [*sorted(tmp_path.glob("*.log")), *sorted(stack.home.glob("worker-*.log"))]
    return "\n".join(f"--- {path.name}\n{path.read_text()[-5000:]}" for path in paths)


def publish_raw_unchecked(client: redis.Redis, raw: str) -> None:
    # What a producer that skips `publish_raw`'s checks (another language, redis-cli) sends.
    client.xadd(keys.EVENTS_STREAM, {"event": raw})
