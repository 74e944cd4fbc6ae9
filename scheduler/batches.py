"""Submitting bulk membership batches: read and validate a file, store the batch, queue it.

Every row is checked before anything is stored, and bad rows are reported by line. The batch
and its items are committed in one transaction, then one start message (the batch id, nothing
else) is sent by task name; the worker splits the batch into Graph-sized chunks and queues
them. The scheduler side never imports the worker: chunking lives with the engine there.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from entraflow import keys
from entraflow.catalogue import BATCH_CHUNK_TASK, BATCH_START_TASK
from entraflow.celery_app import app
from entraflow.settings import Settings
from models.batches import (
    FINAL_BATCH_STATUSES,
    BatchStateError,
    ItemAction,
    NewItem,
    add_batch,
    get_batch,
    mark_enqueued,
    pending_chunks,
    stranded_batches,
    unfinished_batches,
)
from models.db import session_scope, utcnow
from scheduler.runs import LOST_MESSAGE_GRACE_S, held_task_args

CSV_COLUMNS = ("action", "user_id", "group_id")
USER_ID_COLUMN = "user_id"
JSON_LINES_SUFFIXES = frozenset({".jsonl", ".ndjson"})
CSV_SUFFIX = ".csv"
# Excel and PowerShell's Export-Csv start UTF-8 files with a byte-order mark.
FILE_ENCODING = "utf-8-sig"
# A batch committed this long ago and still not queued is stranded: its submitter died.
STRANDED_BATCH_GRACE_S = 60.0
STRANDED_BATCHES_PER_PASS = 100


class BatchFileError(ValueError):
    """Raised when a batch or members file cannot be read as a whole (format, header, empty)."""


@dataclass(frozen=True)
class Problem:
    """Why one line of a file was refused."""

    line: int
    message: str


@dataclass(frozen=True)
class Duplicate:
    """A row that repeats an earlier one exactly; it is dropped."""

    line: int
    duplicate_of: int


@dataclass
class ParsedBatch:
    """The valid rows of a file, its refused lines and the repeated rows dropped."""

    items: list[NewItem] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)


def is_guid(value: str) -> bool:
    """Whether `value` is a GUID in its canonical 8-4-4-4-12 form, as Entra object ids are."""
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def read_batch_file(path: Path) -> ParsedBatch:
    """Parse a CSV (`action,user_id,group_id`) or JSON lines file, decided by name or content."""
    try:
        text = path.read_text(encoding=FILE_ENCODING)
    except (OSError, UnicodeDecodeError) as exc:
        raise BatchFileError(f"cannot read {path}: {exc}") from exc
    if path.suffix.lower() in JSON_LINES_SUFFIXES:
        return parse_json_lines(text)
    if path.suffix.lower() != CSV_SUFFIX and text.lstrip().startswith("{"):
        return parse_json_lines(text)
    return parse_csv(text)


def parse_csv(text: str) -> ParsedBatch:
    """Rows of a CSV with the header `action,user_id,group_id` (any column order)."""
    reader = csv.DictReader(io.StringIO(text), skipinitialspace=True)
    header = [name.strip().lower() for name in reader.fieldnames or []]
    if sorted(header) != sorted(CSV_COLUMNS):
        raise BatchFileError(
            f"the CSV header must be {','.join(CSV_COLUMNS)}, got {','.join(header) or 'nothing'}"
        )
    reader.fieldnames = header
    rows: list[tuple[int, dict[str, object]]] = []
    line = reader.line_num
    for record in reader:
        line = reader.line_num
        if None in record:
            rows.append((line, {"": "more fields than the header"}))
            continue
        rows.append((line, dict(record)))
    return _validate(rows)


def parse_json_lines(text: str) -> ParsedBatch:
    """Rows of a JSON lines file: one `{"action", "user_id", "group_id"}` object a line."""
    rows: list[tuple[int, dict[str, object]]] = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError as exc:
            rows.append((line, {"": f"not JSON: {exc}"}))
            continue
        if not isinstance(record, dict):
            rows.append((line, {"": "not a JSON object"}))
            continue
        rows.append((line, record))
    return _validate(rows)


def _validate(rows: Iterable[tuple[int, dict[str, object]]]) -> ParsedBatch:
    parsed = ParsedBatch()
    seen: dict[tuple[str, str], tuple[int, ItemAction]] = {}
    for line, record in rows:
        problem = _problem(record)
        if problem:
            parsed.problems.append(Problem(line, problem))
            continue
        action = ItemAction(str(record["action"]).strip().lower())
        user_id = str(record["user_id"]).strip().lower()
        group_id = str(record["group_id"]).strip().lower()
        earlier = seen.get((user_id, group_id))
        if earlier is not None:
            earlier_line, earlier_action = earlier
            if earlier_action == action:
                parsed.duplicates.append(Duplicate(line, earlier_line))
            else:
                # Chunks run in parallel, so the order of the two rows could not be kept.
                message = f"{action} contradicts the {earlier_action} on line {earlier_line}"
                parsed.problems.append(Problem(line, message))
            continue
        seen[(user_id, group_id)] = (line, action)
        parsed.items.append(NewItem(line, action, user_id, group_id))
    if not parsed.items and not parsed.problems:
        raise BatchFileError("the file has no rows")
    return parsed


def _problem(record: dict[str, object]) -> str | None:
    """What is wrong with one record, or None."""
    if "" in record:
        return str(record[""])
    unknown = sorted(set(record) - set(CSV_COLUMNS))
    if unknown:
        return f"unknown field {unknown[0]!r}"
    values = {name: record.get(name) for name in CSV_COLUMNS}
    missing = [name for name, value in values.items() if not isinstance(value, str) or not value]
    if missing:
        return f"{missing[0]} is missing"
    action = str(values["action"]).strip().lower()
    if action not in {choice.value for choice in ItemAction}:
        return f"action must be add or remove, got {values['action']!r}"
    for name in ("user_id", "group_id"):
        if not is_guid(str(values[name]).strip()):
            return f"{name} must be an object id (a GUID), got {values[name]!r}"
    return None


def read_member_list(path: Path) -> tuple[list[str], list[Problem]]:
    """User ids from a file of one id a line, or a CSV with a `user_id` column; with problems."""
    try:
        text = path.read_text(encoding=FILE_ENCODING)
    except (OSError, UnicodeDecodeError) as exc:
        raise BatchFileError(f"cannot read {path}: {exc}") from exc
    lines = text.splitlines()
    first = next((raw for raw in lines if raw.strip()), "")
    values: list[tuple[int, str]]
    if "," in first or first.strip().lower() == USER_ID_COLUMN:
        reader = csv.DictReader(io.StringIO(text), skipinitialspace=True)
        header = [name.strip().lower() for name in reader.fieldnames or []]
        if USER_ID_COLUMN not in header:
            raise BatchFileError(f"the CSV has no {USER_ID_COLUMN} column")
        reader.fieldnames = header
        values = [(reader.line_num, (record[USER_ID_COLUMN] or "").strip()) for record in reader]
    else:
        values = [(line, raw.strip()) for line, raw in enumerate(lines, start=1) if raw.strip()]
    user_ids: list[str] = []
    problems: list[Problem] = []
    for line, value in values:
        if is_guid(value):
            user_ids.append(value.lower())
        else:
            problems.append(Problem(line, f"user_id must be an object id (a GUID), got {value!r}"))
    return user_ids, problems


def submit_batch(settings: Settings, source: str, items: Sequence[NewItem]) -> str:
    """Store a batch of validated rows, commit, queue it, and return its id."""
    if not items:
        raise BatchStateError("a batch needs at least one row")
    with session_scope(settings.resolved_database_url) as session:
        batch_id = add_batch(session, source, items)
    enqueue_batch(settings, batch_id)
    return batch_id


def enqueue_batch(settings: Settings, batch_id: str) -> None:
    """Send a committed batch's start message; the worker queues the chunks with rows left."""
    app.send_task(BATCH_START_TASK, args=(batch_id,), argsrepr=f"batch_id={batch_id!r}")
    mark_enqueued(settings.resolved_database_url, batch_id)


def resume_batch(settings: Settings, batch_id: str) -> None:
    """Queue again the chunks of a batch that still have rows: its messages were lost."""
    batch = get_batch(settings.resolved_database_url, batch_id)
    if batch is None:
        raise LookupError(f"no batch {batch_id!r}")
    if batch.status in FINAL_BATCH_STATUSES:
        raise BatchStateError(f"batch {batch_id} has already ended: {batch.status}")
    enqueue_batch(settings, batch_id)


def enqueue_stranded_batches(
    settings: Settings,
    *,
    grace_s: float = STRANDED_BATCH_GRACE_S,
    lost_grace_s: float = LOST_MESSAGE_GRACE_S,
) -> list[str]:
    """Queue what batches miss: start messages never sent, messages lost; return their ids.

    A batch committed more than `grace_s` ago was never queued when its submitter died first. A
    batch queued more than `lost_grace_s` ago with a message lost with a dying worker (see
    `scheduler.runs`) gets that message again: its start, or each chunk with rows left that
    has no message waiting or held.
    """
    database_url = settings.resolved_database_url
    cutoff = utcnow() - timedelta(seconds=grace_s)
    stranded = stranded_batches(database_url, cutoff, STRANDED_BATCHES_PER_PASS)
    for batch_id in stranded:
        enqueue_batch(settings, batch_id)
    for batch_id, chunks in lost_batch_messages(settings, grace_s=lost_grace_s).items():
        if chunks is None:
            enqueue_batch(settings, batch_id)
        for chunk in chunks or []:
            enqueue_chunk(batch_id, chunk)
        stranded.append(batch_id)
    return stranded


def lost_batch_messages(
    settings: Settings, *, grace_s: float = LOST_MESSAGE_GRACE_S
) -> dict[str, list[int] | None]:
    """The chunks of unfinished batches whose message is neither waiting nor held, by batch.

    None for a batch not yet split whose start message is lost. A chunk's delivery records
    every row of it before its message is acknowledged, so a chunk with rows left and no
    message has lost it.
    """
    database_url = settings.resolved_database_url
    cutoff = utcnow() - timedelta(seconds=grace_s)
    unfinished = unfinished_batches(database_url, cutoff, STRANDED_BATCHES_PER_PASS)
    held = held_task_args(keys.BULK_QUEUE) if unfinished else None
    if held is None:
        return {}
    # A start message carries the batch id; a chunk message the batch id and the chunk.
    starting = {args[0] for args in held if len(args) == 1}
    chunks_held = {args for args in held if len(args) == 2}
    lost: dict[str, list[int] | None] = {}
    for batch_id, split in unfinished:
        if batch_id in starting:
            continue  # the start queues whatever its batch misses
        if not split:
            lost[batch_id] = None
            continue
        missing = [
            chunk
            for chunk in pending_chunks(database_url, batch_id)
            if (batch_id, str(chunk)) not in chunks_held
        ]
        if missing:
            lost[batch_id] = missing
    return lost


def enqueue_chunk(batch_id: str, chunk: int) -> None:
    """Send the message of one chunk of a split batch again."""
    app.send_task(
        BATCH_CHUNK_TASK, args=(batch_id, chunk), argsrepr=f"batch_id={batch_id!r}, chunk={chunk}"
    )
