"""Bulk membership batches: the batch, one item per row asked, and how each row ended.

What `entraflow batch` shows of them is read in `models.batch_reports`.

Counts are never kept on the batch row: several workers record chunks of the same batch at the
same time, so `done` and the outcome counts are read from the items, which each chunk updates
with plain per-row statements that any number of writers can run side by side.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from itertools import islice, zip_longest
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Index, func, or_, update
from sqlmodel import Field, Session, SQLModel, col, select

from models.audit import (
    ADD_ACTION,
    REMOVE_ACTION,
    Actor,
    BatchRow,
    current_actor,
    membership_change,
    record_membership_changes,
)
from models.db import Timestamp, session_scope, utcnow

# The outcome of a row that was never attempted because its batch was cancelled.
CANCELLED_OUTCOME = "cancelled"
# Items inserted per statement when a batch is stored, and read per round trip by a report.
ITEMS_PER_ROUND_TRIP = 1000


def new_batch_id() -> str:
    return str(uuid.uuid4())


class BatchStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_BATCH_STATUSES = frozenset({BatchStatus.SUCCEEDED, BatchStatus.FAILED, BatchStatus.CANCELLED})


class ItemAction(StrEnum):
    ADD = "add"
    REMOVE = "remove"


class Batch(SQLModel, table=True):
    """One bulk membership batch: a file submitted, or a group sync."""

    __tablename__ = "batch"

    id: str = Field(default_factory=new_batch_id, primary_key=True)
    source: str
    status: BatchStatus = Field(default=BatchStatus.QUEUED, index=True)
    total: int
    # How many requests the worker split the batch into; none until it has.
    chunks: int | None = None
    created_at: datetime = Field(default_factory=utcnow, index=True, sa_type=Timestamp)
    # Set once its start message is on the queue: a batch committed but never queued has none.
    enqueued_at: datetime | None = Field(default=None, sa_type=Timestamp)
    started_at: datetime | None = Field(default=None, sa_type=Timestamp)
    finished_at: datetime | None = Field(default=None, sa_type=Timestamp)


class BatchItem(SQLModel, table=True):
    """One row of a batch: a membership change and, once done, how it ended."""

    __tablename__ = "batch_item"
    __table_args__ = (
        # A claim's rows: those of a chunk not yet ended (migration 0002).
        Index("ix_batch_item_batch_chunk_outcome", "batch_id", "chunk", "outcome"),
        Index("ix_batch_item_batch_outcome", "batch_id", "outcome"),
    )

    id: int | None = Field(default=None, primary_key=True)
    batch_id: str = Field(foreign_key="batch.id")
    # The row's line in the submitted file (its position, for a group sync).
    line: int
    action: ItemAction
    user_id: str
    group_id: str
    chunk: int | None = None
    # Deliveries of its chunk that tried the row, not counting waits for the Graph budget.
    attempts: int = 0
    outcome: str | None = None
    # Whether the outcome is a success (`already_member` and `not_member` are).
    success: bool | None = None
    http_status: int | None = None
    code: str | None = None
    message: str | None = None
    request_id: str | None = None
    finished_at: datetime | None = Field(default=None, sa_type=Timestamp)


# The items table as SQLAlchemy Core sees it, for updates of many rows in one statement.
_ITEMS = SQLModel.metadata.tables[BatchItem.__tablename__]


@dataclass(frozen=True)
class NewItem:
    """A validated row to store in a new batch."""

    line: int
    action: ItemAction
    user_id: str
    group_id: str


@dataclass(frozen=True)
class RepeatedItem:
    """A stored row naming the same membership as the row of an earlier line, its first."""

    id: int
    line: int
    action: ItemAction
    first_line: int
    first_action: ItemAction


@dataclass(frozen=True)
class PendingItem:
    """A row of a chunk still to apply."""

    id: int
    action: ItemAction
    user_id: str
    group_id: str
    attempts: int = 0


@dataclass(frozen=True)
class ItemResult:
    """How one row ended, as the worker records it."""

    item_id: int
    outcome: str
    success: bool
    http_status: int | None = None
    code: str | None = None
    message: str | None = None
    request_id: str | None = None


class BatchStateError(Exception):
    """Raised when a batch is asked to do what its status does not allow."""


def add_batch(session: Session, source: str, items: Iterable[NewItem]) -> str:
    """Add a queued batch and its items to `session`, uncommitted, and return the batch id.

    The items are read as they are inserted, a round trip's worth at a time: a file of a
    million rows streams through without being held.
    """
    batch = Batch(source=source, total=0)
    session.add(batch)
    session.flush()
    total = 0
    for chunk in _chunks(items, ITEMS_PER_ROUND_TRIP):
        # Core, not the ORM's bulk insert: half the time a row, with nothing kept per row.
        session.execute(
            _ITEMS.insert(),
            [
                {
                    "batch_id": batch.id,
                    "line": item.line,
                    "action": item.action,
                    "user_id": item.user_id,
                    "group_id": item.group_id,
                }
                for item in chunk
            ],
        )
        total += len(chunk)
    batch.total = total
    session.flush()
    return batch.id


def _chunks(items: Iterable[NewItem], size: int) -> Iterator[list[NewItem]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def repeated_items(session: Session, batch_id: str) -> Iterator[RepeatedItem]:
    """The items of a batch naming a membership that an item of an earlier line names too.

    Found by the database, so that no process holds every row of a large batch to find them.
    """
    window: dict[str, Any] = {
        "partition_by": (_ITEMS.c.user_id, _ITEMS.c.group_id),
        "order_by": (_ITEMS.c.line, _ITEMS.c.id),
    }
    action_type = _ITEMS.c.action.type
    ranked = (
        sa.select(
            _ITEMS.c.id,
            _ITEMS.c.line,
            _ITEMS.c.action,
            func.row_number().over(**window).label("position"),
            func.first_value(_ITEMS.c.line).over(**window).label("first_line"),
            func.first_value(_ITEMS.c.action, type_=action_type).over(**window).label("first"),
        )
        .where(_ITEMS.c.batch_id == batch_id)
        .subquery()
    )
    query = sa.select(
        ranked.c.id, ranked.c.line, ranked.c.action, ranked.c.first_line, ranked.c.first
    ).where(ranked.c.position > 1)
    rows = session.execute(query, execution_options={"yield_per": ITEMS_PER_ROUND_TRIP})
    for item_id, line, action, first_line, first_action in rows:
        yield RepeatedItem(item_id, line, ItemAction(action), first_line, ItemAction(first_action))


def drop_items(session: Session, batch_id: str, item_ids: Sequence[int]) -> None:
    """Delete items of a batch not yet queued, uncommitted, and count them off its total."""
    for start in range(0, len(item_ids), ITEMS_PER_ROUND_TRIP):
        chunk = list(item_ids[start : start + ITEMS_PER_ROUND_TRIP])
        session.execute(
            sa.delete(_ITEMS).where(_ITEMS.c.batch_id == batch_id).where(_ITEMS.c.id.in_(chunk))
        )
    session.execute(
        update(Batch)
        .where(col(Batch.id) == batch_id)
        .values(total=col(Batch.total) - len(item_ids))
    )


def mark_enqueued(database_url: str, batch_id: str) -> None:
    """Note that the batch's start message is on the queue."""
    with session_scope(database_url) as session:
        session.execute(update(Batch).where(col(Batch.id) == batch_id).values(enqueued_at=utcnow()))


def get_batch(database_url: str, batch_id: str) -> Batch | None:
    with session_scope(database_url) as session:
        return session.get(Batch, batch_id)


def split_into_chunks(
    database_url: str, batch_id: str, *, adds_per_chunk: int, removals_per_chunk: int
) -> None:
    """Number a batch's items by chunk, once: adds per group, then removals, in item order.

    The numbering `worker.bulk.chunk_rows` gives the items in id order, computed by the
    database: each group's adds (groups in the order of their first add, compared in lower
    case) go `adds_per_chunk` to a chunk, then every removal, whatever its group,
    `removals_per_chunk` to a chunk. No row passes through this process, so a batch of any
    size splits in the same memory. The count, the claim and the numbering are one
    transaction: a worker that dies half-way leaves the batch unsplit, for the next delivery.
    """
    in_batch = _ITEMS.c.batch_id == batch_id
    adds = in_batch & (_ITEMS.c.action == ItemAction.ADD)
    removals = in_batch & (_ITEMS.c.action == ItemAction.REMOVE)
    # Stored group ids are lower-case GUIDs already; lower() keeps the rule of chunk_rows, and
    # SQLite's ASCII-only lower() agrees with Python's on them.
    group = func.lower(_ITEMS.c.group_id)
    groups = (
        sa.select(
            group.label("key"),
            func.min(_ITEMS.c.id).label("first_id"),
            ((func.count() + (adds_per_chunk - 1)) // adds_per_chunk).label("chunks"),
        )
        .where(adds)
        .group_by(group)
        .subquery()
    )
    with session_scope(database_url) as session:
        add_chunks = int(session.execute(sa.select(func.sum(groups.c.chunks))).scalar_one() or 0)
        removal_count = session.execute(
            sa.select(func.count()).select_from(_ITEMS).where(removals)
        ).scalar_one()
        removal_chunks = (removal_count + removals_per_chunk - 1) // removals_per_chunk
        claimed = session.execute(
            update(Batch)
            .where(col(Batch.id) == batch_id)
            .where(col(Batch.chunks).is_(None))
            .values(chunks=add_chunks + removal_chunks)
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            return  # gone, or another delivery split it first: its numbering stands
        # A group's first chunk follows the chunks of every group first added before it.
        chunks_so_far = func.sum(groups.c.chunks).over(order_by=groups.c.first_id, rows=(None, 0))
        first_chunks = sa.select(
            groups.c.key,
            (sa.cast(chunks_so_far, sa.Integer) - groups.c.chunks).label("first_chunk"),
        ).subquery()
        numbered_adds = (
            sa.select(
                _ITEMS.c.id,
                (first_chunks.c.first_chunk + _position(group) // adds_per_chunk).label("chunk"),
            )
            .join(first_chunks, first_chunks.c.key == group)
            .where(adds)
            .subquery()
        )
        numbered_removals = (
            sa.select(
                _ITEMS.c.id,
                (add_chunks + _position() // removals_per_chunk).label("chunk"),
            )
            .where(removals)
            .subquery()
        )
        for numbered in (numbered_adds, numbered_removals):
            session.execute(
                update(_ITEMS).where(_ITEMS.c.id == numbered.c.id).values(chunk=numbered.c.chunk)
            )


def _position(*partition_by: Any) -> Any:
    """An item's place among the rows of its partition, from 0, in id order."""
    # Typed, so that `//` stays the integer division both databases share (not FLOOR()).
    row_number = func.row_number(type_=sa.Integer).over(
        partition_by=partition_by or None, order_by=_ITEMS.c.id
    )
    return row_number - 1


def pending_chunks(database_url: str, batch_id: str) -> list[int]:
    """The chunks of a batch that still have rows to apply, in turns among their groups.

    A group's adds are numbered together; queued in that order, every free worker thread would
    write to one group at once, and Graph answers a group's writes past a few with 503s
    (GRAPH.md). So the first chunk of each group comes first, then the second of each, and so
    on; the removal chunks (each a `$batch` across groups) take their turns as one more group.
    """
    with session_scope(database_url) as session:
        chunks = session.execute(
            sa.select(
                _ITEMS.c.chunk, func.min(_ITEMS.c.action), func.min(func.lower(_ITEMS.c.group_id))
            )
            .where(_ITEMS.c.batch_id == batch_id)
            .where(_ITEMS.c.outcome.is_(None))
            .where(_ITEMS.c.chunk.is_not(None))
            .group_by(_ITEMS.c.chunk)
            .order_by(_ITEMS.c.chunk)
        ).all()
    turns: dict[str | None, list[int]] = {}
    for chunk, action, group in chunks:
        key = group if action == ItemAction.ADD else None
        turns.setdefault(key, []).append(chunk)
    return [chunk for turn in zip_longest(*turns.values()) for chunk in turn if chunk is not None]


def claim_chunk(database_url: str, batch_id: str, chunk: int) -> list[PendingItem]:
    """The rows of a chunk still to apply, one attempt counted on each; none once it has ended.

    The batch is marked running by its first chunk.
    """
    with session_scope(database_url) as session:
        batch = session.get(Batch, batch_id)
        if batch is None or batch.status in FINAL_BATCH_STATUSES:
            return []
        if batch.status == BatchStatus.QUEUED:
            batch.status = BatchStatus.RUNNING
            batch.started_at = utcnow()
        pending = (
            (col(BatchItem.batch_id) == batch_id)
            & (col(BatchItem.chunk) == chunk)
            & col(BatchItem.outcome).is_(None)
        )
        session.execute(
            update(BatchItem).where(pending).values(attempts=col(BatchItem.attempts) + 1)
        )
        rows = session.execute(
            sa.select(
                _ITEMS.c.id,
                _ITEMS.c.action,
                _ITEMS.c.user_id,
                _ITEMS.c.group_id,
                _ITEMS.c.attempts,
            )
            .where(pending)
            .order_by(col(BatchItem.id))
        ).all()
        return [PendingItem(*row) for row in rows]


def release_attempt(database_url: str, item_ids: Sequence[int]) -> None:
    """Take back the attempt counted on rows whose chunk only waited for the Graph budget."""
    with session_scope(database_url) as session:
        session.execute(
            update(BatchItem)
            .where(col(BatchItem.id).in_(item_ids))
            .where(col(BatchItem.attempts) > 0)
            .values(attempts=col(BatchItem.attempts) - 1)
        )


def record_results(
    database_url: str,
    batch_id: str,
    results: Sequence[ItemResult],
    *,
    client_id: str | None = None,
    tenant_id: str | None = None,
) -> None:
    """Store how rows ended, with their audit entries, then end the batch if no row is left.

    A row already recorded keeps its outcome: a redelivered chunk cannot overwrite the first
    answer, nor audit a row twice. A row marked cancelled while its chunk was in flight gets its
    real outcome. `client_id` and `tenant_id` name the app when no connection is stored.
    A chunk costs a few statements, whatever its size: a statement per row cost 3 ms of CPU a
    row, more than anything else a chunk does (issue 11).
    """
    by_id = {result.item_id: result for result in results}
    with session_scope(database_url) as session:
        if by_id:
            # Locked until the commit where the database locks rows (PostgreSQL), so a chunk
            # recorded at the same time by another delivery waits, then finds none of them left.
            # Found by id alone: with the batch in the condition, SQLite read the batch's every
            # unfinished row through the (batch, outcome) index.
            found = session.execute(
                sa.select(
                    _ITEMS.c.id,
                    _ITEMS.c.batch_id,
                    _ITEMS.c.line,
                    _ITEMS.c.action,
                    _ITEMS.c.user_id,
                    _ITEMS.c.group_id,
                )
                .where(_ITEMS.c.id.in_(by_id))
                .where(_RECORDABLE)
                .order_by(_ITEMS.c.id)
                .with_for_update()
            ).all()
            recordable = [row for row in found if row.batch_id == batch_id]
            if recordable:
                now = utcnow()
                session.execute(
                    _RECORD_RESULT, [_result_values(by_id[row.id], now) for row in recordable]
                )
                actor = current_actor(session, client_id=client_id, tenant_id=tenant_id)
                record_membership_changes(
                    session, [_audit(batch_id, row, by_id[row.id], actor) for row in recordable]
                )
        _settle(session, batch_id)


# A row takes an outcome once; a cancelled one still takes the real outcome of its request.
_RECORDABLE = or_(_ITEMS.c.outcome.is_(None), _ITEMS.c.outcome == CANCELLED_OUTCOME)
_RECORD_RESULT = (
    update(_ITEMS)
    .where(_ITEMS.c.id == sa.bindparam("item_id"))
    .where(_RECORDABLE)
    .values(
        outcome=sa.bindparam("new_outcome"),
        success=sa.bindparam("new_success"),
        http_status=sa.bindparam("new_http_status"),
        code=sa.bindparam("new_code"),
        message=sa.bindparam("new_message"),
        request_id=sa.bindparam("new_request_id"),
        finished_at=sa.bindparam("new_finished_at"),
    )
)


def _result_values(result: ItemResult, now: datetime) -> dict[str, Any]:
    return {
        "item_id": result.item_id,
        "new_outcome": result.outcome,
        "new_success": result.success,
        "new_http_status": result.http_status,
        "new_code": result.code,
        "new_message": result.message,
        "new_request_id": result.request_id,
        "new_finished_at": now,
    }


def _audit(batch_id: str, row: sa.Row[Any], result: ItemResult, actor: Actor) -> dict[str, Any]:
    failed = not result.success
    return membership_change(
        action=ADD_ACTION if row.action == ItemAction.ADD else REMOVE_ACTION,
        user_id=row.user_id,
        group_id=row.group_id,
        outcome=result.outcome,
        actor=actor,
        cause=BatchRow(batch_id, row.line),
        request_id=result.request_id,
        error_code=result.code if failed else None,
        error_message=result.message if failed else None,
    )


def _settle(session: Session, batch_id: str) -> None:
    """End a running batch whose rows have all ended: failed if any row did not succeed."""
    # Runs after every chunk: one row left is enough to know (the (batch_id, outcome) index
    # finds it at once), where counting them cost time in proportion to the batch.
    if _any_item(session, batch_id, col(BatchItem.outcome).is_(None)):
        return
    unsuccessful = _any_item(session, batch_id, col(BatchItem.success).is_not(True))
    # Concurrent last chunks may both get here: the status condition makes it happen once.
    session.execute(
        update(Batch)
        .where(col(Batch.id) == batch_id)
        .where(col(Batch.status).in_([BatchStatus.QUEUED, BatchStatus.RUNNING]))
        .values(
            status=BatchStatus.FAILED if unsuccessful else BatchStatus.SUCCEEDED,
            finished_at=utcnow(),
        )
    )


def _any_item(session: Session, batch_id: str, condition: Any) -> bool:
    """Whether a row of the batch meets `condition`: it stops at the first one."""
    found = session.exec(
        select(BatchItem.id).where(BatchItem.batch_id == batch_id).where(condition).limit(1)
    ).first()
    return found is not None


def cancel_batch(database_url: str, batch_id: str) -> None:
    """Cancel a batch: rows not yet attempted end as `cancelled`, queued chunks do nothing."""
    with session_scope(database_url) as session:
        batch = session.get(Batch, batch_id)
        if batch is None:
            raise LookupError(f"no batch {batch_id!r}")
        if batch.status in FINAL_BATCH_STATUSES:
            raise BatchStateError(f"batch {batch_id} has already ended: {batch.status}")
        now = utcnow()
        batch.status = BatchStatus.CANCELLED
        batch.finished_at = now
        session.execute(
            update(BatchItem)
            .where(col(BatchItem.batch_id) == batch_id)
            .where(col(BatchItem.outcome).is_(None))
            .values(outcome=CANCELLED_OUTCOME, success=False, finished_at=now)
        )


def unfinished_batches(database_url: str, cutoff: datetime, limit: int) -> list[tuple[str, bool]]:
    """Queued or running batches queued before `cutoff`, each with whether it has been split."""
    with session_scope(database_url) as session:
        rows = session.exec(
            select(Batch.id, Batch.chunks)
            .where(col(Batch.status).in_([BatchStatus.QUEUED, BatchStatus.RUNNING]))
            .where(col(Batch.enqueued_at) < cutoff)
            .order_by(col(Batch.enqueued_at))
            .limit(limit)
        ).all()
    return [(batch_id, chunks is not None) for batch_id, chunks in rows]


def stranded_batches(database_url: str, cutoff: datetime, limit: int) -> list[str]:
    """Queued batches committed before `cutoff` whose start message was never sent."""
    with session_scope(database_url) as session:
        return list(
            session.exec(
                select(Batch.id)
                .where(col(Batch.enqueued_at).is_(None))
                .where(Batch.status == BatchStatus.QUEUED)
                .where(col(Batch.created_at) < cutoff)
                .order_by(col(Batch.created_at))
                .limit(limit)
            ).all()
        )
