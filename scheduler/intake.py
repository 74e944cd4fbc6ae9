"""The scheduler: events on the stream become flow runs, with nothing lost and nothing run twice.

Every scheduler reads `entraflow:events` in one consumer group, so several share the work. For
each entry: parse and check the event; if its (source, id) was accepted before, only make sure
its runs are queued; otherwise write the accepted event and the run of every matching enabled
flow in one transaction, commit, queue the chains, and only then acknowledge the entry. A crash
anywhere before the acknowledgement leaves the entry pending; another scheduler claims it once
it has been idle for `events_claim_idle_s` and finds the work done or does it.

An event that cannot be used goes to `entraflow:events:dead` with a reason, acknowledged in the
same transaction. A failure known to pass (a database, Redis or the broker unreachable, busy or
timing out) acknowledges nothing: the scheduler backs off and reads the entry again. Any other
failure while handling an event, a value the database refuses or a bug, makes that event a dead
letter too: no event, whatever it holds, can stop or stall a scheduler (issue 13).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis
from kombu.exceptions import LimitExceeded as BrokerLimitExceeded
from kombu.exceptions import OperationalError as BrokerUnavailable
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, IntegrityError, StatementError
from sqlmodel import Session, select

from entraflow import keys, logs, metrics
from entraflow.settings import Settings
from entraflow.templating import TemplateProblem, evaluate_condition
from models.db import database_error_summary, is_transient_database_error, session_scope
from models.flows import AcceptedEvent
from models.runs import utcnow
from scheduler.flows import FlowDefinition, enabled_flows_for
from scheduler.housekeeping import HOUSEKEEPING_INTERVAL_S, housekeeping_round
from scheduler.producer import EVENT_FIELD, MAX_EVENT_BYTES, InvalidEvent, parse_event
from scheduler.runs import FlowDefinitionError, add_run, enqueue_run, unqueued_runs

log = logging.getLogger(__name__)

# Entries read per XREADGROUP, and claimed per XAUTOCLAIM.
READ_COUNT = 10
# How long one read waits for new entries; it bounds how late a stop request is noticed.
READ_BLOCK_MS = 1000
# How often a scheduler looks for entries another one left pending.
CLAIM_INTERVAL_S = 1.0
# Waits after a database or Redis failure: doubling from the first to the last. The last bounds
# how long the scheduler stays idle once the service is back (30 s left events waiting half a
# minute after a Redis restart); one failed try every few seconds costs nothing.
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 4.0

# The longest dead letter reason, in bytes of UTF-8: a reason names a fault, it does not carry
# the event (which the letter holds anyway).
MAX_REASON_BYTES = 4096

# What is known to pass, and so leaves an entry pending: the services the scheduler depends on
# unreachable, busy or timing out (the database's failures are judged by `models.db`).
# Everything else dead-letters the event, since a failure retried forever holds up every later
# event (issue 13).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,  # refused, reset, loading its data, wrong password, no connection free
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica, during a failover
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.OutOfMemoryError,
    BrokerUnavailable,  # publishing a chain once kombu's own retries are spent
    BrokerLimitExceeded,
    ConnectionError,  # the builtins, from a socket no library wrapped
    TimeoutError,
)
# Redis error replies, by their first word, that a later try can get past: the group deleted
# (created again), a server loading its data or refusing writes after a failed save, busy
# running a script, out of memory, or a cluster failing over.
TRANSIENT_REDIS_REPLIES = frozenset(
    {"NOGROUP", "LOADING", "MISCONF", "BUSY", "OOM", "MASTERDOWN", "READONLY", "TRYAGAIN"}
)


class Outcome(StrEnum):
    """What the scheduler did with one stream entry."""

    ACCEPTED = "accepted"
    # The same source and id were accepted before: no new run, only its runs made sure of.
    DUPLICATE = "duplicate"
    DEAD = "dead"
    # The entry was deleted from the stream while pending: nothing left to do.
    GONE = "gone"
    # A database or Redis failure: not acknowledged, to be read again.
    PENDING = "pending"


@dataclass(frozen=True)
class Handled:
    """What became of one stream entry."""

    stream_id: str
    outcome: Outcome
    run_ids: tuple[str, ...] = ()
    reason: str | None = None


class UnusableEvent(Exception):
    """Raised when an event cannot become runs; its message is the dead letter's reason."""


Entry = tuple[bytes, Mapping[bytes, bytes] | None]


class Scheduler:
    """One scheduler process's reading of the events stream, as `consumer` in the group."""

    def __init__(self, settings: Settings, redis_client: redis.Redis, consumer: str) -> None:
        if redis_client.get_connection_kwargs().get("decode_responses"):
            # An event that is not UTF-8 must reach the dead letters, not break the read.
            raise ValueError("the scheduler needs a Redis client that returns bytes")
        self.settings = settings
        self.redis = redis_client
        self.consumer = consumer
        # After a failure, or on start, first read again what this consumer holds pending.
        self._read_own_pending = True
        self._claim_cursor = "0-0"
        self._group_ready = False

    def ensure_group(self) -> None:
        """Create the consumer group, reading from the stream's start, unless it exists."""
        try:
            # From 0, not $: events pushed before the first scheduler ever started count too.
            self.redis.xgroup_create(
                keys.EVENTS_STREAM, keys.SCHEDULERS_GROUP, id="0", mkstream=True
            )
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def step(
        self, *, block_ms: int | None = None, stop: threading.Event | None = None
    ) -> list[Handled]:
        """Read one batch (this consumer's pending entries first, then new ones) and handle it."""
        if not self._group_ready:
            self.ensure_group()
        entries: list[Entry] = []
        if self._read_own_pending:
            entries = self._read("0", block_ms=None)
            self._read_own_pending = bool(entries)
        if not entries:
            entries = self._read(">", block_ms=block_ms)
        return self.handle_entries(entries, stop=stop)

    def _read(self, start: str, *, block_ms: int | None) -> list[Entry]:
        try:
            reply: Any = self.redis.xreadgroup(
                keys.SCHEDULERS_GROUP,
                self.consumer,
                {keys.EVENTS_STREAM: start},
                count=READ_COUNT,
                block=block_ms,
            )
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):  # the stream was deleted under us: create it again
                self._group_ready = False
            raise
        return reply[0][1] if reply else []

    def claim_idle(self, *, stop: threading.Event | None = None) -> list[Handled]:
        """Take over and handle entries left pending on any consumer past `events_claim_idle_s`."""
        if not self._group_ready:
            self.ensure_group()
        reply = self.redis.xautoclaim(
            keys.EVENTS_STREAM,
            keys.SCHEDULERS_GROUP,
            self.consumer,
            min_idle_time=int(self.settings.events_claim_idle_s * 1000),
            start_id=self._claim_cursor,
            count=READ_COUNT,
        )
        # Redis 7 adds a third element, the ids it dropped because they were deleted.
        cursor, entries = reply[0], reply[1]
        self._claim_cursor = _text(cursor)
        if entries:
            log.info("claimed %d idle events from other schedulers", len(entries))
        return self.handle_entries(entries, stop=stop)

    def handle_entries(
        self, entries: Iterable[Entry], *, stop: threading.Event | None = None
    ) -> list[Handled]:
        """Handle entries in order; at a failure or a stop request, leave the rest pending."""
        handled: list[Handled] = []
        for raw_id, fields in entries:
            if stop is not None and stop.is_set():
                break
            stream_id = _text(raw_id)
            with logs.bound(stream_id=stream_id):
                try:
                    result = self.handle_entry(stream_id, fields)
                except Exception as exc:
                    # The event's own faults are dead letters by now: what is left is a service
                    # failing, or Redis refusing the acknowledgement or the dead letter itself.
                    if is_transient(exc):
                        log.warning("event %s left pending: %s", stream_id, exc)
                    else:
                        log.exception("event %s left pending", stream_id)
                    self._read_own_pending = True
                    handled.append(Handled(stream_id, Outcome.PENDING, reason=str(exc)))
                    metrics.EVENTS.labels(Outcome.PENDING).inc()
                    break
            handled.append(result)
            metrics.EVENTS.labels(result.outcome).inc()
        return handled

    def handle_entry(self, stream_id: str, fields: Mapping[bytes, bytes] | None) -> Handled:
        """Turn one stream entry into runs or a dead letter, and acknowledge it."""
        if not fields:  # deleted from the stream while it was pending
            self._ack(stream_id)
            return Handled(stream_id, Outcome.GONE)
        raw = fields.get(EVENT_FIELD.encode())
        try:
            if raw is None:
                names = sorted(_text(name) for name in fields)
                raise UnusableEvent(f"the entry has no {EVENT_FIELD!r} field, only {names}")
            event = _parse(raw)
            logs.bind(event_id=str(event["id"]))
            outcome, run_ids = self._accept(stream_id, event)
        except UnusableEvent as exc:
            reason = str(exc)
        except Exception as exc:
            if is_transient(exc):
                raise
            reason = _failure_reason(exc)
        else:
            self._ack(stream_id)
            return Handled(stream_id, outcome, tuple(run_ids))
        reason = _bounded(reason)
        # Should this write fail, Redis is failing: the entry stays pending and is read again.
        self._dead_letter(stream_id, raw or b"", reason)
        return Handled(stream_id, Outcome.DEAD, reason=reason)

    def _accept(self, stream_id: str, event: dict[str, Any]) -> tuple[Outcome, list[str]]:
        url = self.settings.resolved_database_url
        try:
            with session_scope(url) as session:
                accepted = _accepted(session, event)
                if accepted is None:
                    run_ids = _add_runs(session, event)
                    session.add(
                        AcceptedEvent(
                            source=event["source"],
                            event_id=event["id"],
                            event_type=event["type"],
                            stream_id=stream_id,
                            run_ids=run_ids,
                        )
                    )
                    outcome, to_queue = Outcome.ACCEPTED, run_ids
                else:
                    run_ids = list(accepted.run_ids)
                    # The first delivery may have died between its commit and its queuing.
                    outcome, to_queue = Outcome.DUPLICATE, unqueued_runs(session, run_ids)
        except IntegrityError:
            # Another scheduler accepted the same source and id first: this one is a duplicate.
            with session_scope(url) as session:
                accepted = _accepted(session, event)
                if accepted is None:
                    raise
                run_ids = list(accepted.run_ids)
                outcome, to_queue = Outcome.DUPLICATE, unqueued_runs(session, run_ids)
        for run_id in to_queue:
            enqueue_run(self.settings, run_id)
        if outcome == Outcome.ACCEPTED:
            log.info("event %s/%s: %d runs", event["source"], event["id"], len(run_ids))
        return outcome, run_ids

    def _dead_letter(self, stream_id: str, raw: bytes, reason: str) -> None:
        log.warning("event %s is a dead letter: %s", stream_id, reason)
        letter = {
            "event": raw[:MAX_EVENT_BYTES],
            "reason": reason,
            "stream_id": stream_id,
            "consumer": self.consumer,
            "time": utcnow().isoformat(),
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(
            keys.DEAD_EVENTS_STREAM,
            letter,  # type: ignore[arg-type]
            maxlen=self.settings.dead_events_max_len,
            approximate=True,
        )
        pipe.xack(keys.EVENTS_STREAM, keys.SCHEDULERS_GROUP, stream_id)
        pipe.execute()

    def _ack(self, stream_id: str) -> None:
        self.redis.xack(keys.EVENTS_STREAM, keys.SCHEDULERS_GROUP, stream_id)

    def release(self, stream_ids: Iterable[str]) -> None:
        """Hand entries this consumer holds to the next scheduler that looks for idle ones."""
        ids: list[int | bytes | str | memoryview] = list(stream_ids)
        if ids:
            idle_ms = int(self.settings.events_claim_idle_s * 1000) + 1
            self.redis.xclaim(
                keys.EVENTS_STREAM,
                keys.SCHEDULERS_GROUP,
                self.consumer,
                0,
                ids,
                idle=idle_ms,
                justid=True,
            )

    def housekeeping(self) -> None:
        """One round of `scheduler.housekeeping`, unless another scheduler has this one."""
        if not self._group_ready:
            self.ensure_group()
        housekeeping_round(self.settings, self.redis, self.consumer)

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Handle events until `stop` is set; survive database and Redis failures, and bugs."""
        stop = stop or threading.Event()
        backoff_s = BACKOFF_FIRST_S
        next_claim = next_housekeeping = time.monotonic()
        log.info("scheduler %s reading %s", self.consumer, keys.EVENTS_STREAM)
        while not stop.is_set():
            try:
                handled = []
                now = time.monotonic()
                if now >= next_claim:
                    # Due again in an interval even if it fails: reading must not wait on it.
                    next_claim = now + CLAIM_INTERVAL_S
                    handled += self.claim_idle(stop=stop)
                if now >= next_housekeeping:
                    # Likewise: a round failing for longer than its lock (a prune hitting the
                    # statement timeout) would otherwise run again before every read.
                    next_housekeeping = now + HOUSEKEEPING_INTERVAL_S
                    self._housekeeping_round()
                handled += self.step(block_ms=READ_BLOCK_MS, stop=stop)
            except Exception as exc:
                # Failing again at once would spin: a bug waits out the same backoff.
                if is_transient(exc):
                    log.warning("scheduler failure, retrying in %.1f s: %s", backoff_s, exc)
                else:
                    log.exception("scheduler failure, retrying in %.1f s", backoff_s)
                stop.wait(backoff_s)
                backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
                continue
            if any(h.outcome == Outcome.PENDING for h in handled):
                stop.wait(backoff_s)
                backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
            else:
                backoff_s = BACKOFF_FIRST_S
        self._release_unhandled()
        log.info("scheduler %s stopped", self.consumer)

    def _housekeeping_round(self) -> None:
        """Housekeeping; a failure that will not pass is logged and waits for the next round."""
        try:
            self.housekeeping()
        except Exception as exc:
            if is_transient(exc):
                raise
            log.exception("housekeeping failed; next round in %.0f s", HOUSEKEEPING_INTERVAL_S)

    def _release_unhandled(self) -> None:
        # Entries read but not reached before the stop: another scheduler may take them at once.
        try:
            mine: Any = self.redis.xpending_range(
                keys.EVENTS_STREAM, keys.SCHEDULERS_GROUP, "-", "+", READ_COUNT * 10, self.consumer
            )
            self.release(_text(entry["message_id"]) for entry in mine)
        except redis.RedisError as exc:
            log.warning("could not release pending events: %s", exc)


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is a failure of a service that a later try can get past."""
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    if isinstance(exc, redis.ResponseError):
        return str(exc).split(" ", 1)[0] in TRANSIENT_REDIS_REPLIES
    return is_transient_database_error(exc)


def _failure_reason(exc: Exception) -> str:
    """The dead letter's reason for a failure that is neither transient nor an `UnusableEvent`."""
    if isinstance(exc, DBAPIError):
        # The database refused a value of the event: every retry would fail the same way.
        return f"the database refused the event: {database_error_summary(exc)}"
    log.exception("internal error while handling an event")
    # SQLAlchemy wraps what a value raised while it was bound: name the cause.
    cause = exc.orig if isinstance(exc, StatementError) and exc.orig is not None else exc
    text = str(cause)
    return f"internal error: {type(cause).__name__}" + (f": {text}" if text else "")


def _bounded(reason: str) -> str:
    """`reason` cut to `MAX_REASON_BYTES` of UTF-8, with what cannot be UTF-8 escaped."""
    encoded = reason.encode("utf-8", "backslashreplace")[:MAX_REASON_BYTES]
    return encoded.decode("utf-8", "ignore")  # a character cut in two is dropped


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        return parse_event(raw)
    except InvalidEvent as exc:
        raise UnusableEvent(str(exc)) from exc


def _accepted(session: Session, event: Mapping[str, Any]) -> AcceptedEvent | None:
    return session.exec(
        select(AcceptedEvent)
        .where(AcceptedEvent.source == event["source"])
        .where(AcceptedEvent.event_id == event["id"])
    ).one_or_none()


def _add_runs(session: Session, event: dict[str, Any]) -> list[str]:
    """Add the run of every enabled flow the event triggers; `UnusableEvent` if one cannot be."""
    try:
        flows = enabled_flows_for(session, event["type"])
    except ValidationError as exc:
        raise UnusableEvent(f"a stored flow for type {event['type']!r} is invalid: {exc}") from exc
    run_ids = []
    for flow in flows:
        if not _triggers(flow, event):
            continue
        try:
            run_ids.append(add_run(session, flow.name, flow.step_dicts(), event))
        except FlowDefinitionError as exc:
            raise UnusableEvent(str(exc)) from exc
    return run_ids


def _triggers(flow: FlowDefinition, event: dict[str, Any]) -> bool:
    if not flow.trigger.if_:
        return True
    try:
        return evaluate_condition(flow.trigger.if_, {"event": event})
    except TemplateProblem as exc:
        # A person's expression on a producer's data (`1 / 0` included): the event's fault.
        raise UnusableEvent(f"flow {flow.name!r}, trigger.if: {exc}") from exc


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
