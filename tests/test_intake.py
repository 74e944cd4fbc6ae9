"""The scheduler's intake, one step at a time, on the session's real Redis and a real database."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from scheduler_thread import running
from sqlalchemy import update
from sqlalchemy.exc import DataError
from sqlmodel import col, select

from entraflow import keys
from entraflow.settings import Settings
from harness.waiting import wait_until
from models.db import session_scope
from models.flows import AcceptedEvent, Flow
from models.runs import FlowRun, utcnow
from scheduler import intake
from scheduler.flows import FlowDefinition
from scheduler.housekeeping import trim_events
from scheduler.intake import Outcome, Scheduler
from scheduler.producer import MAX_EVENT_BYTES, publish_event
from scheduler.runs import create_run

HIRED = "hr.employee.hired"
# Upper bound on the waits for a scheduler thread: none of them is a timing assertion.
WAIT_S = 60.0
LOOKUP = [{"id": "user", "action": "lookup_user", "with": {"upn": "{{ event.data.upn }}"}}]
ADD = [
    *LOOKUP,
    {
        "id": "add",
        "action": "add_user_to_group",
        "with": {"user_id": "{{ steps.user.id }}", "group_id": "{{ event.data.group_id }}"},
    },
]


def add_flow(
    settings: Settings,
    name: str,
    *,
    trigger_type: str = HIRED,
    condition: str | None = None,
    steps: list[dict[str, Any]] = LOOKUP,
    enabled: bool = True,
) -> None:
    definition = FlowDefinition.model_validate(
        {"name": name, "trigger": {"type": trigger_type, "if": condition}, "steps": steps}
    )
    with session_scope(settings.resolved_database_url) as session:
        session.add(
            Flow(
                name=name,
                trigger_type=trigger_type,
                definition=definition.model_dump(by_alias=True),
                enabled=enabled,
            )
        )


def hired(redis_client: redis.Redis, event_id: str, source: str = "hr", **data: Any) -> str:
    return publish_event(
        redis_client, type=HIRED, source=source, id=event_id, data={"upn": "a@b.c", **data}
    )


def raw_event(**overrides: Any) -> dict[str, Any]:
    event = {"specversion": "1.0", "id": "e1", "source": "hr", "type": HIRED, "data": {}}
    return {**event, **overrides}


# Every kind of unusable entry value, with what its dead letter's reason must say.
MALFORMED: dict[str, tuple[bytes | str, str]] = {
    "not-json": (b"{not json", "not JSON"),
    "not-utf8": (b'{"id": "\xff"}', "not UTF-8"),
    "not-object": (b"[1, 2]", "JSON array, not an object"),
    "specversion": (json.dumps(raw_event(specversion="0.3")), "specversion must be '1.0'"),
    "no-id": (json.dumps({k: v for k, v in raw_event().items() if k != "id"}), "'id' must be"),
    "empty-source": (json.dumps(raw_event(source="")), "'source' must be a non-empty string"),
    "type-not-string": (json.dumps(raw_event(type=7)), "'type' must be a non-empty string"),
    "data-array": (
        json.dumps(raw_event(data=["a"])),
        "'data' must be a JSON object, not a JSON array",
    ),
    "data-string": (
        json.dumps(raw_event(data="x")),
        "'data' must be a JSON object, not a JSON string",
    ),
    "data-base64": (json.dumps(raw_event(data_base64="AA==")), "'data_base64' is not supported"),
    "too-large": (json.dumps(raw_event(data={"x": "y" * MAX_EVENT_BYTES})), "the limit is 262144"),
    "too-deep": (b"[" * 100_000, "nested too deeply"),
}


def runs_of(settings: Settings, event_id: str) -> list[FlowRun]:
    with session_scope(settings.resolved_database_url) as session:
        return list(
            session.exec(
                select(FlowRun).where(FlowRun.event_id == event_id).order_by(col(FlowRun.flow))
            ).all()
        )


def accepted(settings: Settings) -> list[AcceptedEvent]:
    with session_scope(settings.resolved_database_url) as session:
        return list(session.exec(select(AcceptedEvent)).all())


def queued_chains(redis_client: redis.Redis) -> int:
    return int(redis_client.llen(keys.FLOWS_QUEUE))


def pending(redis_client: redis.Redis) -> int:
    summary: Any = redis_client.xpending(keys.EVENTS_STREAM, keys.SCHEDULERS_GROUP)
    return int(summary["pending"])


def dead_letters(redis_client: redis.Redis) -> list[dict[str, bytes]]:
    entries: Any = redis_client.xrange(keys.DEAD_EVENTS_STREAM)
    return [{k.decode(): v for k, v in fields.items()} for _, fields in entries]


@pytest.fixture
def scheduler(settings: Settings, redis_client: redis.Redis) -> Scheduler:
    return Scheduler(settings, redis_client, "scheduler-1")


def test_an_event_becomes_one_run_per_matching_enabled_flow_queued_then_acknowledged(
    settings: Settings, redis_client: redis.Redis, scheduler: Scheduler
) -> None:
    add_flow(settings, "add-to-sales", steps=ADD)
    add_flow(settings, "lookup")
    add_flow(settings, "switched-off", enabled=False)
    add_flow(settings, "other-type", trigger_type="hr.employee.left")
    # Pushed before any scheduler created the group: the group starts at 0, so it counts.
    hired(redis_client, "e1", group_id="g1")

    [handled] = scheduler.step()

    assert handled.outcome == Outcome.ACCEPTED
    runs = runs_of(settings, "e1")
    assert [run.flow for run in runs] == ["add-to-sales", "lookup"]
    assert set(handled.run_ids) == {run.id for run in runs}
    assert all(
        run.enqueued_at is not None and run.event["data"]["group_id"] == "g1" for run in runs
    )
    [record] = accepted(settings)
    assert (record.source, record.event_id, record.event_type) == ("hr", "e1", HIRED)
    assert set(record.run_ids) == set(handled.run_ids)
    assert record.stream_id == handled.stream_id
    assert queued_chains(redis_client) == 2
    assert pending(redis_client) == 0


def test_trigger_if_decides_which_flows_an_event_starts(
    settings: Settings, redis_client: redis.Redis, scheduler: Scheduler
) -> None:
    add_flow(settings, "sales-only", condition="{{ event.data.department == 'Sales' }}")
    hired(redis_client, "sales-hire", department="Sales")
    hired(redis_client, "hr-hire", department="HR")

    sales, hr = scheduler.step()

    assert [run.flow for run in runs_of(settings, "sales-hire")] == ["sales-only"]
    assert (sales.outcome, len(sales.run_ids)) == (Outcome.ACCEPTED, 1)
    assert (hr.outcome, hr.run_ids) == (Outcome.ACCEPTED, ())
    assert runs_of(settings, "hr-hire") == []


def test_an_event_matching_no_flow_is_recorded_and_acknowledged_not_dead(
    settings: Settings, redis_client: redis.Redis, scheduler: Scheduler
) -> None:
    hired(redis_client, "lonely")

    [handled] = scheduler.step()

    assert (handled.outcome, handled.run_ids) == (Outcome.ACCEPTED, ())
    assert [(r.event_id, r.run_ids) for r in accepted(settings)] == [("lonely", [])]
    assert pending(redis_client) == 0
    assert dead_letters(redis_client) == []


def test_the_same_source_and_id_twice_makes_one_set_of_runs(
    settings: Settings, redis_client: redis.Redis, scheduler: Scheduler
) -> None:
    add_flow(settings, "lookup")
    hired(redis_client, "e1")
    hired(redis_client, "e1")
    hired(redis_client, "e1", source="another-hr")

    first, again, other_source = scheduler.step()

    assert first.outcome == Outcome.ACCEPTED
    assert (again.outcome, again.run_ids) == (Outcome.DUPLICATE, first.run_ids)
    assert other_source.outcome == Outcome.ACCEPTED
    assert len(runs_of(settings, "e1")) == 2
    assert queued_chains(redis_client) == 2
    assert pending(redis_client) == 0


def test_runs_committed_but_not_queued_are_queued_when_the_event_is_read_again(
    settings: Settings,
    redis_client: redis.Redis,
    scheduler: Scheduler,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    add_flow(settings, "lookup")
    hired(redis_client, "e1")

    def broker_down(*_: Any) -> None:
        raise redis.ConnectionError("broker down")

    with monkeypatch.context() as patch:
        patch.setattr(intake, "enqueue_run", broker_down)
        [failed] = scheduler.step()
    [run] = runs_of(settings, "e1")
    assert failed.outcome == Outcome.PENDING
    assert run.enqueued_at is None and pending(redis_client) == 1

    [retried] = scheduler.step()  # this consumer's own pending entries come first
    hired(redis_client, "e1")
    [duplicate] = scheduler.step()

    assert (retried.outcome, retried.run_ids) == (Outcome.DUPLICATE, (run.id,))
    assert duplicate.outcome == Outcome.DUPLICATE
    assert [r.id for r in runs_of(settings, "e1")] == [run.id]
    assert runs_of(settings, "e1")[0].enqueued_at is not None
    assert queued_chains(redis_client) == 1
    assert pending(redis_client) == 0


@pytest.mark.parametrize(("raw", "reason"), MALFORMED.values(), ids=MALFORMED.keys())
def test_an_unusable_event_becomes_a_dead_letter_with_its_reason_and_is_acknowledged(
    settings: Settings,
    redis_client: redis.Redis,
    scheduler: Scheduler,
    raw: bytes | str,
    reason: str,
) -> None:
    add_flow(settings, "lookup")
    stream_id = redis_client.xadd(keys.EVENTS_STREAM, {"event": raw}).decode()

    [handled] = scheduler.step()

    assert handled.outcome == Outcome.DEAD
    assert handled.reason is not None and reason in handled.reason
    [letter] = dead_letters(redis_client)
    assert reason in letter["reason"].decode()
    assert letter["stream_id"].decode() == stream_id
    assert letter["consumer"] == b"scheduler-1"
    assert letter["time"]
    encoded = raw if isinstance(raw, bytes) else raw.encode()
    assert letter["event"] == encoded[:MAX_EVENT_BYTES]
    assert pending(redis_client) == 0
    assert accepted(settings) == []


def test_an_entry_without_an_event_field_is_a_dead_letter(
    redis_client: redis.Redis, scheduler: Scheduler
) -> None:
    redis_client.xadd(keys.EVENTS_STREAM, {"payload": "{}"})

    [handled] = scheduler.step()

    assert handled.outcome == Outcome.DEAD
    assert (
        dead_letters(redis_client)[0]["reason"]
        == b"the entry has no 'event' field, only ['payload']"
    )


@pytest.mark.parametrize(
    ("condition", "reason"),
    [
        ("{{ event.data.department == 'Sales' }}", "has no attribute 'department'"),
        ("{{ event.data.upn / 0 }}", "TypeError"),
        ("{{ event.data.count / 0 }}", "ZeroDivisionError"),
    ],
)
def test_a_trigger_if_failing_on_the_event_makes_a_dead_letter_and_no_run(
    settings: Settings,
    redis_client: redis.Redis,
    scheduler: Scheduler,
    condition: str,
    reason: str,
) -> None:
    add_flow(settings, "always")
    add_flow(settings, "picky", condition=condition)
    hired(redis_client, "e1", count=3)

    [handled] = scheduler.step()

    assert handled.outcome == Outcome.DEAD
    assert handled.reason is not None
    assert "flow 'picky', trigger.if" in handled.reason and reason in handled.reason
    # All or nothing: the flow whose trigger held did not get a run either.
    assert runs_of(settings, "e1") == [] and accepted(settings) == []
    assert pending(redis_client) == 0


def test_an_event_the_database_refuses_is_a_dead_letter_not_retried_forever(
    settings: Settings,
    redis_client: redis.Redis,
    scheduler: Scheduler,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    add_flow(settings, "lookup")
    hired(redis_client, "e1")

    def refuse(*_: Any) -> str:
        raise DataError("INSERT", {}, ValueError("unsupported Unicode escape sequence"))

    monkeypatch.setattr(intake, "add_run", refuse)
    [handled] = scheduler.step()

    assert handled.outcome == Outcome.DEAD
    assert handled.reason == "the database refused the event: unsupported Unicode escape sequence"
    assert pending(redis_client) == 0 and accepted(settings) == []


def test_a_database_failure_leaves_the_entry_pending_until_the_database_is_back(
    settings: Settings, redis_client: redis.Redis
) -> None:
    add_flow(settings, "lookup")
    hired(redis_client, "e1")
    # Nothing listens on port 1: every connection is refused at once.
    unusable = settings.model_copy(
        update={"database_url": "postgresql+psycopg://u:p@127.0.0.1:1/entraflow"}
    )

    [failed] = Scheduler(unusable, redis_client, "scheduler-1").step()

    assert failed.outcome == Outcome.PENDING and failed.reason
    assert pending(redis_client) == 1 and dead_letters(redis_client) == []

    # The same consumer, restarted with its database back, reads its pending entry first.
    [handled] = Scheduler(settings, redis_client, "scheduler-1").step()

    assert handled.outcome == Outcome.ACCEPTED and len(handled.run_ids) == 1
    assert pending(redis_client) == 0


def test_an_entry_left_pending_by_a_dead_scheduler_is_claimed_once_idle(
    settings: Settings, redis_client: redis.Redis
) -> None:
    add_flow(settings, "lookup")
    hired(redis_client, "e1")
    crashed = Scheduler(settings, redis_client, "crashed")
    crashed.ensure_group()
    # Read as the crashed scheduler did, then nothing: no acknowledgement ever comes.
    redis_client.xreadgroup(keys.SCHEDULERS_GROUP, "crashed", {keys.EVENTS_STREAM: ">"})
    patient = Scheduler(settings, redis_client, "patient")
    quick = Scheduler(
        settings.model_copy(update={"events_claim_idle_s": 0.05}), redis_client, "quick"
    )

    assert patient.claim_idle() == []  # not idle long enough for the default
    time.sleep(0.1)
    [handled] = quick.claim_idle()

    assert handled.outcome == Outcome.ACCEPTED and len(runs_of(settings, "e1")) == 1
    assert pending(redis_client) == 0


def test_trimming_removes_only_acknowledged_entries_beyond_the_length_kept(
    settings: Settings, redis_client: redis.Redis
) -> None:
    scheduler = Scheduler(
        settings.model_copy(update={"events_max_len": 3}), redis_client, "scheduler-1"
    )
    scheduler.ensure_group()
    ids = [hired(redis_client, f"e{n}") for n in range(10)]
    stream_ids = [entry[0] for entry in redis_client.xrange(keys.EVENTS_STREAM)]
    assert len(ids) == len(stream_ids) == 10
    # Six delivered to a consumer that acknowledges only the first two.
    redis_client.xreadgroup(keys.SCHEDULERS_GROUP, "slow", {keys.EVENTS_STREAM: ">"}, count=6)
    redis_client.xack(keys.EVENTS_STREAM, keys.SCHEDULERS_GROUP, *stream_ids[:2])

    # Stops at the oldest pending entry, then at the first entry no scheduler has read.
    assert trim_events(scheduler.settings, redis_client) == 2
    redis_client.xack(keys.EVENTS_STREAM, keys.SCHEDULERS_GROUP, *stream_ids[2:6])
    assert trim_events(scheduler.settings, redis_client) == 4
    remaining = [entry[0] for entry in redis_client.xrange(keys.EVENTS_STREAM)]
    assert remaining == stream_ids[6:]

    handled = scheduler.step()
    assert [h.outcome for h in handled] == [Outcome.ACCEPTED] * 4
    assert trim_events(scheduler.settings, redis_client) == 1
    assert redis_client.xlen(keys.EVENTS_STREAM) == 3


def test_trimming_before_any_scheduler_read_keeps_every_entry(
    settings: Settings, redis_client: redis.Redis
) -> None:
    for n in range(5):
        hired(redis_client, f"e{n}")
    scheduler = Scheduler(
        settings.model_copy(update={"events_max_len": 1}), redis_client, "scheduler-1"
    )
    scheduler.ensure_group()

    assert trim_events(scheduler.settings, redis_client) == 0
    assert redis_client.xlen(keys.EVENTS_STREAM) == 5


def test_a_run_committed_but_never_queued_is_queued_by_housekeeping(
    settings: Settings, redis_client: redis.Redis, scheduler: Scheduler
) -> None:
    event = raw_event()
    fresh = create_run(settings, "lookup", LOOKUP, event)
    stranded = create_run(settings, "lookup", LOOKUP, event)
    with session_scope(settings.resolved_database_url) as session:
        session.execute(
            update(FlowRun)
            .where(col(FlowRun.id) == stranded)
            .values(created_at=utcnow() - timedelta(minutes=5))
        )

    scheduler.housekeeping()
    scheduler.housekeeping()  # within the interval: another round does nothing

    by_id = {run.id: run for run in runs_of(settings, "e1")}
    assert by_id[stranded].enqueued_at is not None
    assert by_id[fresh].enqueued_at is None  # its starter may still be about to queue it
    assert queued_chains(redis_client) == 1


def test_a_stopping_scheduler_hands_its_unhandled_entries_to_the_next_at_once(
    settings: Settings, redis_client: redis.Redis, scheduler: Scheduler
) -> None:
    for n in range(3):
        hired(redis_client, f"e{n}")
    stop = threading.Event()
    stop.set()

    assert scheduler.step(stop=stop) == []  # read, then stopped before the first entry
    assert pending(redis_client) == 3
    scheduler.run_forever(stop)
    handled = Scheduler(settings, redis_client, "next").claim_idle()

    assert [h.outcome for h in handled] == [Outcome.ACCEPTED] * 3


def test_run_forever_survives_redis_being_unreachable_and_stops_on_request(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No client-side retries: the scheduler's own backoff is what is tested.
    unreachable = redis.Redis(port=1, socket_connect_timeout=0.1, retry=Retry(NoBackoff(), 0))
    scheduler = Scheduler(settings, unreachable, "scheduler-1")
    monkeypatch.setattr(intake, "BACKOFF_FIRST_S", 0.01)
    tries: list[None] = []
    first_try = scheduler.ensure_group

    def counted_try() -> None:
        tries.append(None)
        first_try()

    monkeypatch.setattr(scheduler, "ensure_group", counted_try)
    with running(scheduler) as errors:
        # Each try reaches for the group first and fails: a third one means two failures survived.
        wait_until(lambda: len(tries) >= 3 or errors, "a third try", timeout_s=WAIT_S, poll_s=0.01)

    assert errors == []
    assert len(tries) >= 3


def test_the_scheduler_refuses_a_client_that_decodes_responses(
    settings: Settings, redis_url: str
) -> None:
    with pytest.raises(ValueError, match="bytes"):
        Scheduler(settings, redis.Redis.from_url(redis_url, decode_responses=True), "s")
