"""Work whose message a dying worker took with it is queued again by the scheduler's housekeeping.

Kombu's Redis transport pops a message off the queue and only then notes that the worker holds
it; a worker SIGKILLed in between takes the message along, and no visibility timeout brings it
back. `python -m chaos --only worker-kill` found a batch waiting forever on such a chunk.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from sqlalchemy import update
from sqlmodel import col, select

from entraflow import keys
from entraflow.catalogue import ACTIONS, BATCH_CHUNK_TASK, BATCH_START_TASK
from entraflow.celery_app import app
from entraflow.settings import Settings
from models.batches import Batch, ItemAction, NewItem, add_batch
from models.db import session_scope, utcnow
from models.runs import FlowRun
from sandbox.directory import DEMO_GROUP_ID, DEMO_GROUPS, DEMO_USER_ID
from scheduler.batches import enqueue_batch, enqueue_chunk, enqueue_stranded_batches
from scheduler.runs import (
    LOST_MESSAGE_GRACE_S,
    create_run,
    enqueue_run,
    enqueue_stranded_runs,
    held_task_args,
)
from worker.batch_tasks import split_batch

ADD = [
    {
        "id": "add",
        "action": "add_user_to_group",
        "with": {"user_id": DEMO_USER_ID, "group_id": DEMO_GROUP_ID},
    }
]
# A second group: a batch adding to both has two chunks.
FALCON_ID = DEMO_GROUPS["falcon"].id
EVENT = {"specversion": "1.0", "id": "e1", "source": "test", "type": "t", "data": {}}
# Longer ago than the grace after which unfinished work with no message counts as lost.
LONG_AGO = timedelta(seconds=LOST_MESSAGE_GRACE_S * 2)


def first_args(redis_client: redis.Redis, queue: str) -> list[str]:
    """The first argument (a run or batch id) of every message waiting on `queue`."""
    messages = [json.loads(raw) for raw in redis_client.lrange(queue, 0, -1)]
    return [json.loads(base64.b64decode(m["body"]))[0][0] for m in messages]


def tasks_waiting(redis_client: redis.Redis, queue: str) -> list[str]:
    return [json.loads(raw)["headers"]["task"] for raw in redis_client.lrange(queue, 0, -1)]


def lose_messages(redis_client: redis.Redis, queue: str) -> None:
    """What a worker SIGKILLed right after taking the messages off the queue leaves behind."""
    redis_client.delete(queue)


@pytest.fixture
def held(redis_client: redis.Redis) -> Iterator[Any]:
    """A broker channel that takes a message and holds it unacknowledged, as a live worker does."""
    with app.connection_for_read() as connection:
        yield connection.default_channel


def queued_run(settings: Settings, *, enqueued_ago: timedelta = LONG_AGO) -> str:
    run_id = create_run(settings, "add", ADD, EVENT)
    enqueue_run(settings, run_id)
    with session_scope(settings.resolved_database_url) as session:
        session.execute(
            update(FlowRun)
            .where(col(FlowRun.id) == run_id)
            .values(created_at=utcnow() - enqueued_ago, enqueued_at=utcnow() - enqueued_ago)
        )
    return run_id


def queued_batch(settings: Settings, *, enqueued_ago: timedelta = LONG_AGO) -> str:
    items = [
        NewItem(2, ItemAction.ADD, DEMO_USER_ID, DEMO_GROUP_ID),
        NewItem(3, ItemAction.ADD, DEMO_USER_ID, FALCON_ID),
    ]
    with session_scope(settings.resolved_database_url) as session:
        batch_id = add_batch(session, "test.csv", items)
    enqueue_batch(settings, batch_id)
    with session_scope(settings.resolved_database_url) as session:
        session.execute(
            update(Batch)
            .where(col(Batch.id) == batch_id)
            .values(created_at=utcnow() - enqueued_ago, enqueued_at=utcnow() - enqueued_ago)
        )
    return batch_id


def test_a_run_whose_message_a_dying_worker_took_is_queued_again(
    settings: Settings, redis_client: redis.Redis
) -> None:
    run_id = queued_run(settings)
    lose_messages(redis_client, keys.FLOWS_QUEUE)

    assert enqueue_stranded_runs(settings) == [run_id]
    assert enqueue_stranded_runs(settings) == []  # queued just now: not idle any more

    assert first_args(redis_client, keys.FLOWS_QUEUE) == [run_id]
    assert tasks_waiting(redis_client, keys.FLOWS_QUEUE) == [ACTIONS["add_user_to_group"].task_name]


def test_a_run_recently_queued_or_whose_message_waits_or_is_held_stays_as_it_is(
    settings: Settings, redis_client: redis.Redis, held: Any
) -> None:
    waiting = queued_run(settings)
    assert enqueue_stranded_runs(settings) == []  # its message is on the queue

    message = held.basic_get(keys.FLOWS_QUEUE)
    assert message is not None and redis_client.llen(keys.FLOWS_QUEUE) == 0
    assert enqueue_stranded_runs(settings) == []  # a worker holds it

    recent = queued_run(settings, enqueued_ago=timedelta(0))
    lose_messages(redis_client, keys.FLOWS_QUEUE)
    assert enqueue_stranded_runs(settings) == []  # its message may be on its way
    with session_scope(settings.resolved_database_url) as session:
        queued = session.exec(select(FlowRun.id).where(col(FlowRun.enqueued_at).is_not(None))).all()
    assert sorted(queued) == sorted([waiting, recent])


def test_a_batch_whose_start_message_a_dying_worker_took_is_started_again(
    settings: Settings, redis_client: redis.Redis
) -> None:
    batch_id = queued_batch(settings)
    lose_messages(redis_client, keys.BULK_QUEUE)

    assert enqueue_stranded_batches(settings) == [batch_id]

    assert tasks_waiting(redis_client, keys.BULK_QUEUE) == [BATCH_START_TASK]
    assert first_args(redis_client, keys.BULK_QUEUE) == [batch_id]
    assert enqueue_stranded_batches(settings) == []  # its start message waits now


def test_a_chunk_whose_message_a_dying_worker_took_is_queued_again_alone(
    settings: Settings, redis_client: redis.Redis, held: Any
) -> None:
    batch_id = queued_batch(settings)
    assert split_batch(settings, batch_id) == [0, 1]
    lose_messages(redis_client, keys.BULK_QUEUE)  # the start ran; the chunks are sent below
    for chunk in (0, 1):
        enqueue_chunk(batch_id, chunk)
    assert held.basic_get(keys.BULK_QUEUE) is not None  # the first chunk, held by a worker
    lose_messages(redis_client, keys.BULK_QUEUE)  # the second, taken by a worker that died

    assert enqueue_stranded_batches(settings) == [batch_id]

    assert tasks_waiting(redis_client, keys.BULK_QUEUE) == [BATCH_CHUNK_TASK]
    assert chunk_args(redis_client) == [[batch_id, 1]]


def test_a_batch_recently_queued_or_whose_messages_wait_or_are_held_stays_as_it_is(
    settings: Settings, redis_client: redis.Redis, held: Any
) -> None:
    queued_batch(settings)
    assert enqueue_stranded_batches(settings) == []  # its start message is on the queue

    assert held.basic_get(keys.BULK_QUEUE) is not None
    assert enqueue_stranded_batches(settings) == []  # a worker holds it

    queued_batch(settings, enqueued_ago=timedelta(0))
    lose_messages(redis_client, keys.BULK_QUEUE)
    assert enqueue_stranded_batches(settings) == []  # its start message may be on its way
    assert redis_client.llen(keys.BULK_QUEUE) == 0


def test_held_messages_are_read_as_json_only(
    settings: Settings, redis_client: redis.Redis, held: Any
) -> None:
    run_id = queued_run(settings)
    assert held.basic_get(keys.FLOWS_QUEUE) is not None
    pickled = {"content-type": "application/x-python-serialize", "body": "gASVAAAAAAAAAACMAXiULg=="}
    redis_client.hset(held.unacked_key, "pickled", json.dumps([pickled, "", keys.FLOWS_QUEUE]))
    redis_client.hset(held.unacked_key, "garbage", b"\xff not json")

    assert held_task_args(keys.FLOWS_QUEUE) == [(run_id, "add")]


def chunk_args(redis_client: redis.Redis) -> list[list[Any]]:
    messages = [json.loads(raw) for raw in redis_client.lrange(keys.BULK_QUEUE, 0, -1)]
    return [json.loads(base64.b64decode(m["body"]))[0] for m in messages]
