"""Poison events: whatever an event holds, the scheduler dead-letters it with a reason and reads on.

Issue 13's rule: no event can stop or stall a scheduler, and an event is judged the same on SQLite
and on PostgreSQL (run this file with `ENTRAFLOW_TEST_DATABASE_URL` set for the second).
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import redis
from kombu.exceptions import OperationalError as BrokerError
from scheduler_thread import running
from sqlalchemy.exc import IntegrityError, OperationalError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlmodel import col, select

from entraflow import keys
from entraflow.settings import Settings
from harness.stack import LocalStack
from harness.waiting import wait_until
from models.db import session_scope
from models.flows import AcceptedEvent, Flow
from models.runs import FlowRun
from sandbox.directory import DEMO_USERS
from scheduler import intake, producer
from scheduler.flows import FlowDefinition
from scheduler.intake import Outcome, Scheduler
from scheduler.producer import (
    MAX_ID_BYTES,
    MAX_INTEGER_DIGITS,
    MAX_NESTING_DEPTH,
    MAX_SOURCE_BYTES,
    MAX_TYPE_BYTES,
    InvalidEvent,
    parse_event,
)

HIRED = "hr.employee.hired"
UPN = DEMO_USERS["nestor"].upn
# The flow reads the event's data in its trigger.if, as the attack's flow did.
FLOW = {
    "name": "sales-lookup",
    "trigger": {"type": HIRED, "if": "{{ event.data.department == 'Sales' }}"},
    "steps": [{"id": "user", "action": "lookup_user", "with": {"upn": "{{ event.data.upn }}"}}],
}
# What the attack sent: past Python's 4,300-digit conversion limit, and nested just short of
# the parser's recursion limit.
HUGE_DIGITS = 5000
ATTACK_DEPTH = 980
# Upper bound on every wait of the process test.
WAIT_S = 60.0
# A scheduler thread's blocking read: the test's stop request waits out at most one.
READ_BLOCK_MS = 50


def event_json(*, marker: str = "", data: dict[str, Any] | None = None, **attributes: Any) -> str:
    """A Sales hire as JSON; `marker`, a string value in its data, is replaced by raw JSON text."""
    event = {
        "specversion": "1.0",
        "id": "poison",
        "source": "hr",
        "type": HIRED,
        "data": {"department": "Sales", "upn": UPN, **(data or {}), "extra": "MARKER"},
        **attributes,
    }
    return json.dumps(event).replace('"MARKER"', marker or '"x"')


def nested(depth: int) -> str:
    """A JSON value of `depth` nested arrays."""
    return "[" * depth + "1" + "]" * depth


# Each poison event, with what its dead letter's reason must say.
POISON: dict[str, tuple[str, str]] = {
    "huge integer": (event_json(marker="9" * HUGE_DIGITS), f"integer of {HUGE_DIGITS} digits"),
    "huge negative integer": (
        event_json(marker="-" + "9" * HUGE_DIGITS),
        f"integer of {HUGE_DIGITS} digits",
    ),
    "integer one digit too long": (
        event_json(marker="1" * (MAX_INTEGER_DIGITS + 1)),
        f"the limit is {MAX_INTEGER_DIGITS}",
    ),
    # The event is level 1 and its data level 2: the value in data starts at level 3.
    "nested 980 deep": (event_json(marker=nested(ATTACK_DEPTH)), "nested too deeply"),
    "nested one level too deep": (
        event_json(marker=nested(MAX_NESTING_DEPTH - 1)),
        "nested too deeply",
    ),
    "oversized id": (event_json(id="i" * 20_000), "'id' is 20000 bytes"),
    "oversized source": (event_json(source="s" * 20_000), "'source' is 20000 bytes"),
    "oversized type": (event_json(type="t" * 20_000), "'type' is 20000 bytes"),
    # Bytes, not characters: what the database's index counts.
    "id of two-byte characters": (event_json(id="é" * MAX_ID_BYTES), f"{2 * MAX_ID_BYTES} bytes"),
    "NaN": (event_json(marker="NaN"), "NaN"),
    "Infinity": (event_json(marker="Infinity"), "Infinity"),
    "-Infinity": (event_json(marker="-Infinity"), "-Infinity"),
    "number beyond a float": (event_json(marker="1e400"), "out of range"),
    "duplicate attribute": (
        event_json().replace('"id": "poison"', '"id": "poison", "id": "other"'),
        "the key 'id' twice",
    ),
    "duplicate key in data": (
        event_json().replace('"department": "Sales"', '"department": "Sales", "department": "HR"'),
        "the key 'department' twice",
    ),
    "NUL in data": (event_json(marker='"a\\u0000b"'), "U+0000"),
    "NUL in id": (event_json(id="a\x00b"), "U+0000"),
    "NUL in a key": (event_json(marker='{"a\\u0000": 1}'), "U+0000"),
    "lone high surrogate in data": (event_json(marker='"\\ud800"'), "lone surrogate"),
    "lone low surrogate in data": (event_json(marker='"a\\udc00"'), "lone surrogate"),
    "lone surrogate in source": (event_json(source="hr\ud800"), "lone surrogate"),
    "lone surrogate in a key": (event_json(marker='{"\\udfff": 1}'), "lone surrogate"),
}


def store_flow(settings: Settings) -> None:
    definition = FlowDefinition.model_validate(FLOW)
    with session_scope(settings.resolved_database_url) as session:
        session.add(
            Flow(
                name=definition.name,
                trigger_type=definition.trigger.type,
                definition=definition.model_dump(by_alias=True),
            )
        )


def push(client: redis.Redis, raw: str | bytes) -> str:
    # As a producer that skips `publish_raw`'s checks (another language, redis-cli) would.
    return client.xadd(keys.EVENTS_STREAM, {"event": raw}).decode()


def good_event(event_id: str) -> str:
    return event_json(id=event_id)


def runs_of(settings: Settings, event_id: str) -> list[FlowRun]:
    with session_scope(settings.resolved_database_url) as session:
        return list(session.exec(select(FlowRun).where(FlowRun.event_id == event_id)).all())


def accepted_ids(settings: Settings) -> list[str]:
    with session_scope(settings.resolved_database_url) as session:
        return sorted(session.exec(select(AcceptedEvent.event_id)).all())


def dead_reasons(client: redis.Redis) -> list[str]:
    letters: Any = client.xrange(keys.DEAD_EVENTS_STREAM)
    return [fields[b"reason"].decode() for _, fields in letters]


def pending(client: redis.Redis) -> int:
    summary: Any = client.xpending(keys.EVENTS_STREAM, keys.SCHEDULERS_GROUP)
    return int(summary["pending"])


@pytest.fixture
def scheduler(settings: Settings, redis_client: redis.Redis) -> Scheduler:
    store_flow(settings)
    return Scheduler(settings, redis_client, "scheduler-1")


@pytest.mark.parametrize(("raw", "reason"), POISON.values(), ids=POISON.keys())
def test_a_poison_event_is_a_dead_letter_with_its_reason_and_the_next_event_runs(
    settings: Settings,
    redis_client: redis.Redis,
    scheduler: Scheduler,
    raw: str,
    reason: str,
) -> None:
    poison_id = push(redis_client, raw.encode("utf-8", "surrogatepass"))
    push(redis_client, good_event("good"))

    dead, good = scheduler.step()

    assert (dead.stream_id, dead.outcome) == (poison_id, Outcome.DEAD)
    assert dead.reason is not None and reason in dead.reason, dead.reason
    assert [reason in letter for letter in dead_reasons(redis_client)] == [True]
    assert (good.outcome, len(good.run_ids)) == (Outcome.ACCEPTED, 1)
    assert accepted_ids(settings) == ["good"]
    assert pending(redis_client) == 0


@pytest.mark.parametrize(("raw", "reason"), POISON.values(), ids=POISON.keys())
def test_a_producer_gets_the_same_reason_before_publishing(raw: str, reason: str) -> None:
    with pytest.raises(InvalidEvent) as refused:
        parse_event(raw.encode("utf-8", "surrogatepass"))

    assert reason in str(refused.value)


def test_a_python_string_holding_a_lone_surrogate_is_refused_as_an_invalid_event() -> None:
    # JSON text as a str, not bytes, with the surrogate itself rather than its escape.
    with pytest.raises(InvalidEvent, match="not UTF-8"):
        parse_event(event_json().replace("Sales", "Sales\ud800"))


def test_values_just_within_every_bound_are_accepted_alike_on_every_database(
    settings: Settings, redis_client: redis.Redis, scheduler: Scheduler
) -> None:
    deepest = event_json(
        id="i" * MAX_ID_BYTES,
        source="s" * MAX_SOURCE_BYTES,
        marker=nested(MAX_NESTING_DEPTH - 2),
        data={
            "big": int("9" * MAX_INTEGER_DIGITS),
            "small": -int("9" * MAX_INTEGER_DIGITS),
            "float": 1.7976931348623157e308,
            "emoji": "\U0001f600",  # a surrogate pair in JSON, one character in Python
            "quote": 'it\'s \\ "quoted"',
        },
    )
    long_type = event_json(id="long-type", type="t" * MAX_TYPE_BYTES)
    push(redis_client, deepest)
    push(redis_client, long_type)

    first, second = scheduler.step()

    assert (first.outcome, len(first.run_ids)) == (Outcome.ACCEPTED, 1), first.reason
    assert (second.outcome, second.run_ids) == (Outcome.ACCEPTED, ()), second.reason
    [run] = runs_of(settings, "i" * MAX_ID_BYTES)
    assert run.event["data"]["emoji"] == "\U0001f600"
    assert run.event["data"]["big"] == int("9" * MAX_INTEGER_DIGITS)


# Failures while an event is handled: which leave it pending (a service is down) and which make
# it a dead letter (the event's fault, or a bug that would otherwise fail it forever).
def _sqlstate(code: str, message: str) -> Exception:
    return OperationalError("INSERT", {}, psycopg.errors.lookup(code)(message))


def _sqlite(message: str, code: int) -> Exception:
    orig = sqlite3.OperationalError(message)
    orig.sqlite_errorcode = code
    return OperationalError("INSERT", {}, orig)


FAILURES: dict[str, tuple[Callable[[], Exception], Outcome, str]] = {
    "PostgreSQL lost the connection": (
        lambda: _sqlstate("08006", "connection failure"),
        Outcome.PENDING,
        "connection failure",
    ),
    "serialization failure": (
        lambda: _sqlstate("40001", "could not serialize"),
        Outcome.PENDING,
        "serialize",
    ),
    "out of connections": (
        lambda: _sqlstate("53300", "too many clients"),
        Outcome.PENDING,
        "too many",
    ),
    "statement timeout": (
        lambda: _sqlstate("57014", "canceling statement"),
        Outcome.PENDING,
        "canceling",
    ),
    "I/O error": (lambda: _sqlstate("58030", "could not write"), Outcome.PENDING, "write"),
    "lock timeout": (lambda: _sqlstate("55P03", "lock not available"), Outcome.PENDING, "lock"),
    "migrations not run": (
        lambda: _sqlstate("42P01", 'relation "accepted_events" does not exist'),
        Outcome.PENDING,
        "does not exist",
    ),
    "a grant missing": (
        lambda: _sqlstate("42501", "permission denied for table runs"),
        Outcome.PENDING,
        "permission denied",
    ),
    "connection refused, no SQLSTATE": (
        lambda: OperationalError("SELECT", {}, psycopg.OperationalError("connection refused")),
        Outcome.PENDING,
        "connection refused",
    ),
    "pool exhausted": (lambda: PoolTimeout("QueuePool limit"), Outcome.PENDING, "QueuePool"),
    "SQLite busy": (lambda: _sqlite("database is locked", 5), Outcome.PENDING, "locked"),
    "Redis down": (lambda: redis.ConnectionError("refused"), Outcome.PENDING, "refused"),
    "Redis loading": (lambda: redis.BusyLoadingError("loading"), Outcome.PENDING, "loading"),
    "broker down": (lambda: BrokerError("broker refused"), Outcome.PENDING, "broker refused"),
    "index row too large": (
        lambda: _sqlstate("54000", "index row size 20040 exceeds btree version 4 maximum 2704"),
        Outcome.DEAD,
        "the database refused the event: index row size 20040 exceeds btree version 4 "
        "maximum 2704 (ProgramLimitExceeded, SQLSTATE 54000)",
    ),
    "bad JSON text": (
        lambda: _sqlstate("22P02", "invalid input syntax for type json"),
        Outcome.DEAD,
        "(InvalidTextRepresentation, SQLSTATE 22P02)",
    ),
    "constraint": (
        lambda: IntegrityError("INSERT", {}, psycopg.errors.lookup("23502")("null value")),
        Outcome.DEAD,
        "(NotNullViolation, SQLSTATE 23502)",
    ),
    "SQLite value too big": (
        lambda: _sqlite("string or blob too big", 18),
        Outcome.DEAD,
        "string or blob too big",
    ),
    "a value SQLAlchemy cannot bind": (
        lambda: StatementError("bind", "INSERT", {}, RecursionError("too deep")),
        Outcome.DEAD,
        "RecursionError",
    ),
    "a bug": (lambda: KeyError("boom"), Outcome.DEAD, "internal error: KeyError: 'boom'"),
    "out of memory": (lambda: MemoryError(), Outcome.DEAD, "internal error: MemoryError"),
    "recursion": (
        lambda: RecursionError("maximum recursion depth exceeded"),
        Outcome.DEAD,
        "internal error: RecursionError: maximum recursion depth exceeded",
    ),
}


@pytest.mark.parametrize(("failure", "outcome", "reason"), FAILURES.values(), ids=FAILURES.keys())
def test_a_failure_while_handling_leaves_the_event_pending_only_when_known_to_be_transient(
    settings: Settings,
    redis_client: redis.Redis,
    scheduler: Scheduler,
    monkeypatch: pytest.MonkeyPatch,
    failure: Callable[[], Exception],
    outcome: Outcome,
    reason: str,
) -> None:
    push(redis_client, good_event("first"))

    def fail(*_: Any) -> str:
        raise failure()

    with monkeypatch.context() as patch:
        patch.setattr(intake, "add_run", fail)
        [handled] = scheduler.step()

    assert handled.outcome == outcome
    assert handled.reason is not None and reason in handled.reason, handled.reason
    push(redis_client, good_event("next"))
    # A pending entry is read again first, now that the service is back; then the new one.
    after = scheduler.step() + scheduler.step()
    expected = ["first", "next"] if outcome == Outcome.PENDING else ["next"]
    assert [h.outcome for h in after] == [Outcome.ACCEPTED] * len(expected)
    assert accepted_ids(settings) == expected
    assert len(dead_reasons(redis_client)) == (outcome == Outcome.DEAD)
    assert pending(redis_client) == 0


def test_an_unexpected_error_is_a_dead_letter_logged_with_its_traceback(
    settings: Settings,
    redis_client: redis.Redis,
    scheduler: Scheduler,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = intake.enabled_flows_for

    def broken_for_one_event(session: Any, event_type: str) -> Any:
        if event_type == "hr.employee.broken":
            raise KeyError("boom")
        return real(session, event_type)

    monkeypatch.setattr(intake, "enabled_flows_for", broken_for_one_event)
    push(redis_client, event_json(type="hr.employee.broken"))
    push(redis_client, good_event("good"))

    dead, good = scheduler.step()

    assert (dead.outcome, dead.reason) == (Outcome.DEAD, "internal error: KeyError: 'boom'")
    assert dead_reasons(redis_client) == ["internal error: KeyError: 'boom'"]
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info is not None and record.exc_info[0] is KeyError
    assert (good.outcome, len(good.run_ids)) == (Outcome.ACCEPTED, 1)


def test_a_reason_too_long_or_not_unicode_is_still_written(
    redis_client: redis.Redis, scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_: Any) -> str:
        raise ValueError("\ud800" + "x" * 1_000_000)

    monkeypatch.setattr(intake, "add_run", fail)
    push(redis_client, good_event("first"))

    [dead] = scheduler.step()

    assert dead.outcome == Outcome.DEAD
    [letter] = dead_reasons(redis_client)
    assert letter.startswith("internal error: ValueError: \\ud800xxx")
    assert len(letter.encode()) <= intake.MAX_REASON_BYTES


def test_a_dead_letter_that_cannot_be_written_leaves_the_event_pending(
    settings: Settings,
    redis_client: redis.Redis,
    scheduler: Scheduler,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    push(redis_client, POISON["huge integer"][0])

    def redis_down(*_: Any) -> None:
        raise redis.ConnectionError("Redis went away")

    with monkeypatch.context() as patch:
        patch.setattr(scheduler, "_dead_letter", redis_down)
        [failed] = scheduler.step()

    assert failed.outcome == Outcome.PENDING and pending(redis_client) == 1
    assert dead_reasons(redis_client) == []
    [dead] = scheduler.step()
    assert dead.outcome == Outcome.DEAD and pending(redis_client) == 0


@pytest.mark.parametrize("where", ["housekeeping", "step", "claim_idle"])
def test_run_forever_carries_on_after_an_unexpected_error(
    settings: Settings,
    redis_client: redis.Redis,
    scheduler: Scheduler,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    real = getattr(scheduler, where)
    failures = iter([RuntimeError("a bug")])

    def fails_once(*args: Any, **kwargs: Any) -> Any:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return real(*args, **kwargs)

    monkeypatch.setattr(scheduler, where, fails_once)
    monkeypatch.setattr(intake, "BACKOFF_FIRST_S", 0.01)
    monkeypatch.setattr(intake, "READ_BLOCK_MS", READ_BLOCK_MS)
    push(redis_client, good_event("good"))
    with running(scheduler) as errors:
        wait_until(lambda: accepted_ids(settings) or errors, "the good event", timeout_s=WAIT_S)

    assert errors == []
    assert accepted_ids(settings) == ["good"]


def test_housekeeping_failing_again_and_again_never_keeps_events_waiting(
    settings: Settings,
    redis_client: redis.Redis,
    scheduler: Scheduler,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A transient failure (a prune hitting the statement timeout, every round): reading goes on.
    def always_times_out() -> None:
        raise redis.TimeoutError("housekeeping timed out")

    monkeypatch.setattr(scheduler, "housekeeping", always_times_out)
    monkeypatch.setattr(intake, "BACKOFF_FIRST_S", 0.01)
    monkeypatch.setattr(intake, "READ_BLOCK_MS", READ_BLOCK_MS)
    push(redis_client, good_event("good"))
    with running(scheduler) as errors:
        wait_until(lambda: accepted_ids(settings) or errors, "the good event", timeout_s=WAIT_S)

    assert errors == []
    assert accepted_ids(settings) == ["good"]


@pytest.mark.integration
def test_a_scheduler_process_survives_the_attacks_events_and_runs_the_next_flow(
    settings: Settings, redis_client: redis.Redis, stack: LocalStack
) -> None:
    store_flow(settings)
    push(redis_client, POISON["huge integer"][0])
    push(redis_client, POISON["nested 980 deep"][0])
    push(redis_client, good_event("good"))
    scheduler = stack.start_scheduler()

    def log() -> str:
        return (stack.home / "scheduler-0.log").read_text()[-5000:]

    deadline = time.monotonic() + WAIT_S
    while [run.status for run in runs_of(settings, "good")] != ["succeeded"]:
        assert scheduler.poll() is None, f"the scheduler exited ({scheduler.returncode}):\n{log()}"
        assert time.monotonic() < deadline, f"the good event's run never succeeded:\n{log()}"
        time.sleep(0.2)

    assert scheduler.poll() is None, log()
    reasons = dead_reasons(redis_client)
    assert len(reasons) == 2, reasons
    assert f"integer of {HUGE_DIGITS} digits" in reasons[0]
    assert "nested too deeply" in reasons[1]
    with session_scope(settings.resolved_database_url) as session:
        assert session.exec(select(col(FlowRun.event_id))).all() == ["good"]


def test_a_value_the_database_refuses_is_never_retried_forever(
    settings: Settings,
    redis_client: redis.Redis,
    scheduler: Scheduler,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With the bound lifted, a 20 KB id reaches the database: PostgreSQL's index refuses it
    # (ProgramLimitExceeded, an OperationalError like a lost connection), SQLite stores it.
    # Random, so that PostgreSQL cannot compress it under the index's limit.
    long_id = random.Random(13).randbytes(10_000).hex()
    monkeypatch.setattr(
        producer, "_MAX_ATTRIBUTE_BYTES", dict.fromkeys(["id", "source", "type"], 10**6)
    )
    push(redis_client, event_json(id=long_id))
    push(redis_client, good_event("good"))

    first, good = scheduler.step()

    if settings.resolved_database_url.startswith("postgresql"):
        assert first.outcome == Outcome.DEAD, first.reason
        assert first.reason is not None
        assert first.reason.startswith("the database refused the event: index row"), first.reason
        assert first.reason.endswith("(ProgramLimitExceeded, SQLSTATE 54000)")
    else:
        assert first.outcome == Outcome.ACCEPTED, first.reason
    assert (good.outcome, len(good.run_ids)) == (Outcome.ACCEPTED, 1)
    assert pending(redis_client) == 0
