"""A batch is split in the database: as `chunk_rows` would, once, in bounded memory, atomically."""

from __future__ import annotations

import os
import random
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from peak_memory import run_measuring_peak
from sqlmodel import Session, col, select

from entraflow.settings import Settings
from models.batches import (
    Batch,
    BatchItem,
    ItemAction,
    NewItem,
    add_batch,
    cancel_batch,
    drop_items,
)
from models.db import session_scope
from worker.batch_tasks import split_batch
from worker.bulk import Row, RowAction, chunk_rows

GROUPS = [str(uuid.UUID(int=(0xC0FFEE << 64) + n)) for n in range(4)]
# Rows of the memory test and its bound. Loading every row, a split of 200,000 rows took 298 MiB
# (a million, 1,047 MiB); numbered in SQL, 200,000 take 134 MiB and a million 126 MiB: about
# what the process starts with.
MEMORY_TEST_ROWS = 200_000
MEMORY_BOUND_MIB = 200


class WorkerKilled(BaseException):
    """Raised in place of a worker dying half-way through a split."""


def user(n: int) -> str:
    return str(uuid.UUID(int=(0xBEEF << 96) + n))


def mixed_rows(seed: int) -> list[NewItem]:
    """Adds and removals of several groups, interleaved, with one group also named in capitals.

    The counts cross the chunk sizes on both sides: 45, 20, 21 and 1 adds, 41 removals.
    """
    adds = {GROUPS[0]: 45, GROUPS[1]: 20, GROUPS[2]: 21, GROUPS[3]: 1}
    rows: list[tuple[ItemAction, str]] = []
    for group, count in adds.items():
        rows += [(ItemAction.ADD, group)] * count
    rows += [(ItemAction.REMOVE, GROUPS[n % len(GROUPS)]) for n in range(41)]
    random.Random(seed).shuffle(rows)
    # chunk_rows compares groups in lower case: the same group in capitals is one group.
    rows = [
        (action, group.upper() if action is ItemAction.ADD and n % 7 == 0 else group)
        for n, (action, group) in enumerate(rows)
    ]
    return [
        NewItem(line, action, user(line), group) for line, (action, group) in enumerate(rows, 2)
    ]


def store(settings: Settings, items: Iterable[NewItem]) -> str:
    with session_scope(settings.resolved_database_url) as session:
        return add_batch(session, "test.csv", items)


def drop_every(settings: Settings, batch_id: str, step: int) -> None:
    """Delete every `step`-th item, as a submit deletes repeated rows: ids with gaps."""
    with session_scope(settings.resolved_database_url) as session:
        ids = session.exec(
            select(BatchItem.id).where(BatchItem.batch_id == batch_id).order_by(col(BatchItem.id))
        ).all()
        drop_items(session, batch_id, [item_id for item_id in ids[::step] if item_id is not None])


def items(settings: Settings, batch_id: str) -> list[BatchItem]:
    with session_scope(settings.resolved_database_url) as session:
        return list(
            session.exec(
                select(BatchItem).where(BatchItem.batch_id == batch_id).order_by(col(BatchItem.id))
            ).all()
        )


def chunks_by_item(settings: Settings, batch_id: str) -> dict[int, int | None]:
    return {item.id or 0: item.chunk for item in items(settings, batch_id)}


def chunk_rows_numbering(settings: Settings, batch_id: str) -> dict[int, int | None]:
    """The numbering the worker gave before the split moved into SQL: `chunk_rows` in id order."""
    rows = [
        Row(item.id or 0, RowAction(item.action.value), item.user_id, item.group_id)
        for item in items(settings, batch_id)
    ]
    return {int(row.row_id): n for n, chunk in enumerate(chunk_rows(rows)) for row in chunk}


def stored_chunk_count(settings: Settings, batch_id: str) -> int | None:
    with session_scope(settings.resolved_database_url) as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        return batch.chunks


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_mixed_batch_is_split_into_the_chunks_chunk_rows_gives(
    settings: Settings, seed: int
) -> None:
    other = store(settings, mixed_rows(seed + 100))  # a batch before it: ids do not start at 1
    batch_id = store(settings, mixed_rows(seed))
    drop_every(settings, batch_id, 9)
    expected = chunk_rows_numbering(settings, batch_id)
    count = len(set(expected.values()))

    assert sorted(split_batch(settings, batch_id)) == list(range(count))

    assert chunks_by_item(settings, batch_id) == expected
    assert stored_chunk_count(settings, batch_id) == count
    assert set(chunks_by_item(settings, other).values()) == {None}  # another batch is its own


@pytest.mark.parametrize(
    ("actions", "sizes"),
    [
        ([ItemAction.ADD] * 41, [20, 20, 1]),
        ([ItemAction.REMOVE] * 40, [20, 20]),
        ([ItemAction.REMOVE] * 3 + [ItemAction.ADD] * 2, [2, 3]),
        ([ItemAction.ADD], [1]),
    ],
)
def test_batches_of_one_action_or_a_few_rows_split_as_chunk_rows_gives(
    settings: Settings, actions: list[ItemAction], sizes: list[int]
) -> None:
    batch_id = store(
        settings,
        [NewItem(n, action, user(n), GROUPS[0]) for n, action in enumerate(actions, 2)],
    )
    expected = chunk_rows_numbering(settings, batch_id)

    assert split_batch(settings, batch_id) == list(range(len(sizes)))

    numbering = chunks_by_item(settings, batch_id)
    assert numbering == expected
    assert [list(numbering.values()).count(n) for n in range(len(sizes))] == sizes


def test_a_second_split_changes_nothing_and_a_cancelled_batch_has_no_chunks_left(
    settings: Settings,
) -> None:
    batch_id = store(settings, mixed_rows(4))
    chunks = split_batch(settings, batch_id)
    numbering = chunks_by_item(settings, batch_id)

    assert split_batch(settings, batch_id) == chunks
    assert chunks_by_item(settings, batch_id) == numbering

    cancelled = store(settings, mixed_rows(5))
    cancel_batch(settings.resolved_database_url, cancelled)
    assert split_batch(settings, cancelled) == []
    assert split_batch(settings, "no-such-batch") == []


@pytest.fixture
def killed_after_first_numbering(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The first split dies right after its first statement that numbers items, uncommitted."""
    execute = Session.execute
    killed = False

    def dying_execute(self: Session, statement: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal killed
        result = execute(self, statement, *args, **kwargs)
        numbers_items = isinstance(statement, sa.Update) and str(statement).startswith(
            f"UPDATE {BatchItem.__tablename__} SET chunk="
        )
        if numbers_items and not killed:
            killed = True
            raise WorkerKilled
        return result

    monkeypatch.setattr(Session, "execute", dying_execute)
    yield
    assert killed, "the split never numbered an item"


def test_a_split_cut_short_half_way_leaves_the_batch_unsplit_and_the_next_splits_it_whole(
    settings: Settings, killed_after_first_numbering: None
) -> None:
    batch_id = store(settings, mixed_rows(6))
    expected = chunk_rows_numbering(settings, batch_id)

    with pytest.raises(WorkerKilled):
        split_batch(settings, batch_id)

    assert stored_chunk_count(settings, batch_id) is None
    assert set(chunks_by_item(settings, batch_id).values()) == {None}

    assert sorted(split_batch(settings, batch_id)) == list(range(len(set(expected.values()))))
    assert chunks_by_item(settings, batch_id) == expected


def _split_in_a_process(
    settings: Settings, batch_id: str, tmp_path: Path
) -> tuple[int, str, float]:
    """Exit code, output and peak resident memory in MiB of a worker process's split."""
    env = {
        **os.environ,
        "ENTRAFLOW_HOME": str(settings.home),
        "ENTRAFLOW_DATABASE_URL": settings.resolved_database_url,
        "ENTRAFLOW_REDIS_URL": str(settings.redis_url),
    }
    code = (
        "import sys\n"
        "from entraflow.settings import get_settings\n"
        "from worker.batch_tasks import split_batch\n"
        "print(len(split_batch(get_settings(), sys.argv[1])))\n"
    )
    output = tmp_path / "split.out"
    with output.open("wb") as out:
        exit_code, peak_mib = run_measuring_peak(
            code,
            [batch_id],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            peak_path=tmp_path / "split.peak",
        )
    return exit_code, output.read_text(), peak_mib


def test_a_large_batch_is_split_in_bounded_memory(settings: Settings, tmp_path: Path) -> None:
    rows = [
        (ItemAction.ADD if n % 3 else ItemAction.REMOVE, GROUPS[n % 4])
        for n in range(MEMORY_TEST_ROWS)
    ]
    batch_id = store(
        settings, (NewItem(n, action, user(n), group) for n, (action, group) in enumerate(rows))
    )
    per_group = Counter(group if action is ItemAction.ADD else None for action, group in rows)
    chunks = sum(-(-count // 20) for count in per_group.values())  # removals 20 a chunk too
    del rows

    code, out, peak_mib = _split_in_a_process(settings, batch_id, tmp_path)

    assert code == 0, out
    assert int(out) == stored_chunk_count(settings, batch_id) == chunks
    assert peak_mib < MEMORY_BOUND_MIB
