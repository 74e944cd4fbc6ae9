"""The Celery tasks of bulk membership batches, thin adapters around `worker.bulk`.

`entra.batch.start` splits a stored batch into chunks (one Graph request each, as
`chunk_rows` cuts them; the database numbers the items, once, without loading them), and
queues a chunk task per chunk that still has rows. `entra.batch.chunk` applies one chunk's
rows not yet done and records each row's outcome. Both carry ids only, are acknowledged late,
and are safe to receive twice: a chunk run again skips recorded rows, and the engine's outcomes
make re-applying an unrecorded row harmless (Graph answers `already_member` / `not_member`).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init
from kombu.exceptions import KombuError

from entraflow import metrics
from entraflow.catalogue import BATCH_CHUNK_TASK, BATCH_START_TASK
from entraflow.celery_app import STORAGE_ERRORS, app
from entraflow.settings import Settings, get_settings
from models.batches import (
    ItemResult,
    PendingItem,
    claim_chunk,
    pending_chunks,
    record_results,
    release_attempt,
    split_into_chunks,
)
from worker.budget import MAX_BATCH_REQUESTS, MAX_MEMBERS_PER_PATCH, Priority
from worker.bulk import Outcome, Row, RowAction, RowOutcome, apply_chunk
from worker.errors import SharedLimitError, TransientGraphError
from worker.graph import GraphClient
from worker.tasks import WorkerTask, lock_client

log = logging.getLogger(__name__)

# The outcomes of a row that ended as asked.
SUCCESS_OUTCOMES = frozenset(
    {Outcome.ADDED, Outcome.ALREADY_MEMBER, Outcome.REMOVED, Outcome.NOT_MEMBER}
)
# The Celery event a chunk sends once recorded; Flower shows the task in state PROGRESS.
PROGRESS_EVENT = "task-progress"
# The action label of a chunk's Graph requests and log lines.
CHUNK_ACTION = "batch_chunk"


@lru_cache(maxsize=1)
def bulk_graph_client() -> GraphClient:
    """This process's Graph client for bulk work: the shared budget, at low priority."""
    return GraphClient.from_settings(
        get_settings(), budget_redis=lock_client(), priority=Priority.LOW
    )


@worker_process_init.connect
def _fresh_client(**_: Any) -> None:
    # A forked child must not share the parent's HTTP or Redis sockets.
    bulk_graph_client.cache_clear()


@dataclass(frozen=True)
class ChunkResult:
    """What one delivery of a chunk did."""

    batch_id: str
    chunk: int
    applied: int
    outcomes: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "chunk": self.chunk,
            "applied": self.applied,
            "outcomes": self.outcomes,
        }


def split_batch(settings: Settings, batch_id: str) -> list[int]:
    """Number the batch's items by chunk (once), and answer the chunks with rows still to do."""
    database_url = settings.resolved_database_url
    split_into_chunks(
        database_url,
        batch_id,
        adds_per_chunk=MAX_MEMBERS_PER_PATCH,
        removals_per_chunk=MAX_BATCH_REQUESTS,
    )
    return pending_chunks(database_url, batch_id)


def run_chunk(settings: Settings, client: GraphClient, batch_id: str, chunk: int) -> ChunkResult:
    """Apply the rows of one chunk not yet done and record how each ended.

    A transient Graph error that the client could not wait out in process is raised, for the
    task to run the chunk again later. Rows end `failed` when the client gave up on Graph, or
    when their chunk was tried `max_step_deliveries` times (Graph kept failing, or a worker
    kept dying on it): a batch always ends.
    """
    database_url = settings.resolved_database_url
    items = claim_chunk(database_url, batch_id, chunk)
    if not items:
        # Redelivered after recording, or the batch was cancelled: settle, change nothing.
        record_results(database_url, batch_id, [])
        return ChunkResult(batch_id, chunk, 0, {})
    rows = [_row(item) for item in items]
    if max(item.attempts for item in items) > settings.max_step_deliveries:
        message = f"tried {settings.max_step_deliveries} times without finishing"
        outcomes = [RowOutcome(row.row_id, Outcome.FAILED, message=message) for row in rows]
    else:
        try:
            outcomes = apply_chunk(client, rows)
        except SharedLimitError:
            release_attempt(database_url, [item.id for item in items])
            raise
        except TransientGraphError as exc:
            if not exc.retries_exhausted:
                raise
            outcomes = [RowOutcome.of_error(row, Outcome.FAILED, exc) for row in rows]
    record_results(
        database_url,
        batch_id,
        [_result(outcome) for outcome in outcomes],
        client_id=settings.client_id,
        tenant_id=settings.tenant_id,
    )
    counts = Counter(outcome.outcome.value for outcome in outcomes)
    return ChunkResult(batch_id, chunk, len(rows), dict(sorted(counts.items())))


def _row(item: PendingItem) -> Row:
    return Row(item.id, RowAction(item.action.value), item.user_id, item.group_id)


def _result(outcome: RowOutcome) -> ItemResult:
    return ItemResult(
        item_id=int(outcome.row_id),
        outcome=outcome.outcome.value,
        success=outcome.outcome in SUCCESS_OUTCOMES,
        http_status=outcome.status,
        code=outcome.code,
        message=outcome.message,
        request_id=outcome.request_id,
    )


class BatchTask(WorkerTask):
    """A task of a bulk membership batch; its first argument is the batch id."""

    id_args = ("batch_id",)
    # Retries are bounded by the Graph client's retry policy (a chunk it gives up on fails), not
    # by a count: waits for the shared budget may send a chunk back to the queue many times.
    max_retries = None


class StartTask(BatchTask):
    """The task that splits a batch and queues its chunks."""

    # The broker went away mid-way: split again later (a chunk queued twice is harmless).
    waits_for = (KombuError, *STORAGE_ERRORS)


class ChunkTask(BatchTask):
    """The task that applies one chunk of a batch."""

    action = CHUNK_ACTION
    # Stopped by the task time limit with nothing recorded, the chunk runs again: each run
    # counts an attempt, so a chunk that always overruns ends its rows failed. Storage away:
    # nothing was recorded for the rows not stored, and the next delivery applies them again.
    waits_for = (TransientGraphError, SoftTimeLimitExceeded, *STORAGE_ERRORS)

    def countdown_s(self, exc: Exception) -> float:
        if isinstance(exc, TransientGraphError):
            return exc.retry_after_s or get_settings().max_inprocess_wait_s
        return super().countdown_s(exc)

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        with self.log_context(args):
            for outcome, rows in retval["outcomes"].items():
                metrics.BATCH_ROWS.labels(outcome).inc(rows)
            # There is no result backend (the history is in SQL), so progress goes out as an
            # event: best effort, since the rows are recorded whether or not the broker takes it.
            try:
                self.send_event(PROGRESS_EVENT, **retval)
            except KombuError as exc:
                log.warning("batch %s chunk %d progress event not sent: %s", *args, exc)


@app.task(name=BATCH_START_TASK, base=StartTask)
def start_batch(batch_id: str) -> dict[str, Any]:
    """Split a batch into chunks and queue a chunk task for each chunk with rows left."""
    chunks = split_batch(get_settings(), batch_id)
    for chunk in chunks:
        apply_batch_chunk.apply_async(
            args=(batch_id, chunk), argsrepr=f"batch_id={batch_id!r}, chunk={chunk}"
        )
    return {"batch_id": batch_id, "queued_chunks": len(chunks)}


@app.task(name=BATCH_CHUNK_TASK, base=ChunkTask)
def apply_batch_chunk(batch_id: str, chunk: int) -> dict[str, Any]:
    """Apply one chunk of a batch and record each row's outcome."""
    return run_chunk(get_settings(), bulk_graph_client(), batch_id, chunk).to_dict()
