"""What `entraflow batch` shows of batches: a batch's counts, rate and time left, its rows.

Read-only: every write to a batch is in `models.batches`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_
from sqlmodel import col, select

from models.batches import (
    FINAL_BATCH_STATUSES,
    ITEMS_PER_ROUND_TRIP,
    Batch,
    BatchItem,
    BatchStatus,
)
from models.db import session_scope, utcnow

# `rate_per_s` counts the rows that ended within this many seconds before now.
RATE_WINDOW_S = 30.0


def batch_view(database_url: str, batch_id: str) -> dict[str, Any] | None:
    """A batch as `batch show` prints it, with its counts, rate and time left; or None."""
    with session_scope(database_url) as session:
        batch = session.get(Batch, batch_id)
        if batch is None:
            return None
        outcomes = {
            str(outcome): count
            for outcome, count in session.execute(
                select(BatchItem.outcome, func.count())
                .where(BatchItem.batch_id == batch_id)
                .where(col(BatchItem.outcome).is_not(None))
                .group_by(col(BatchItem.outcome))
                .order_by(col(BatchItem.outcome))
            ).all()
        }
        now = utcnow()
        recent = session.exec(
            select(func.count())
            .select_from(BatchItem)
            .where(BatchItem.batch_id == batch_id)
            .where(col(BatchItem.finished_at) >= now - timedelta(seconds=RATE_WINDOW_S))
        ).one()
        return _view(batch, outcomes, recent, now)


def _view(batch: Batch, outcomes: Mapping[str, int], recent: int, now: datetime) -> dict[str, Any]:
    done = sum(outcomes.values())
    rate_per_s: float | None = None
    if batch.started_at is not None:
        end = batch.finished_at or now
        elapsed_s = (end - batch.started_at).total_seconds()
        if batch.finished_at is not None:
            rate_per_s = done / elapsed_s if elapsed_s > 0 else None
        else:
            # While running, the recent pace: after a resume the average since start misleads.
            window_s = min(RATE_WINDOW_S, elapsed_s)
            rate_per_s = recent / window_s if window_s > 0 else None
    eta_s: float | None = None
    if batch.status in FINAL_BATCH_STATUSES:
        eta_s = 0.0
    elif rate_per_s:
        eta_s = (batch.total - done) / rate_per_s
    return {
        "id": batch.id,
        "status": batch.status.value,
        "source": batch.source,
        "total": batch.total,
        "done": done,
        "outcomes": dict(outcomes),
        "rate_per_s": None if rate_per_s is None else round(rate_per_s, 2),
        "eta_s": None if eta_s is None else round(eta_s, 1),
        "created_at": batch.created_at,
        "started_at": batch.started_at,
        "finished_at": batch.finished_at,
    }


def list_batches(
    database_url: str, *, limit: int, status: BatchStatus | None = None
) -> list[dict[str, Any]]:
    """The newest batches first, with their counts."""
    query = select(Batch.id)
    if status is not None:
        query = query.where(Batch.status == status)
    with session_scope(database_url) as session:
        ids = session.exec(query.order_by(col(Batch.created_at).desc()).limit(limit)).all()
    views = (batch_view(database_url, batch_id) for batch_id in ids)
    return [view for view in views if view is not None]


def report_rows(database_url: str, batch_id: str) -> Iterator[dict[str, Any]]:
    """Every row of a batch in file order, with how it ended."""
    last_line, last_id = -1, -1
    while True:
        with session_scope(database_url) as session:
            page = session.exec(
                select(BatchItem)
                .where(BatchItem.batch_id == batch_id)
                .where(
                    or_(
                        col(BatchItem.line) > last_line,
                        (col(BatchItem.line) == last_line) & (col(BatchItem.id) > last_id),
                    )
                )
                .order_by(col(BatchItem.line), col(BatchItem.id))
                .limit(ITEMS_PER_ROUND_TRIP)
            ).all()
        if not page:
            return
        for item in page:
            yield {
                "line": item.line,
                "action": item.action.value,
                "user_id": item.user_id,
                "group_id": item.group_id,
                "outcome": item.outcome,
                "code": item.code,
                "message": item.message,
                "request_id": item.request_id,
            }
        last_line, last_id = page[-1].line, page[-1].id or 0
