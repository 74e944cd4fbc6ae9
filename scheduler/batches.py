"""Submitting bulk membership batches: read and validate a file, store the batch, queue it.

A file is streamed: each row is checked and stored as it is read, so a million rows take the
memory of a few; a line longer than any row is never read whole, and a file of more rows than
`batch_max_rows` is refused. Bad rows are reported by line. The batch and its items are
committed in one transaction, or nothing is, then one start message (the batch id, nothing
else) is sent by task name; the worker splits the batch into Graph-sized chunks and queues
them. The scheduler side never imports the worker: chunking lives with the engine there.
"""

from __future__ import annotations

import csv
import heapq
import io
import re
from array import array
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Generic, TextIO, TypeVar

from entraflow import keys
from entraflow.catalogue import BATCH_CHUNK_TASK, BATCH_START_TASK
from entraflow.celery_app import app
from entraflow.settings import Settings, get_settings
from models.batches import (
    FINAL_BATCH_STATUSES,
    BatchStateError,
    ItemAction,
    NewItem,
    add_batch,
    drop_items,
    get_batch,
    mark_enqueued,
    pending_chunks,
    repeated_items,
    stranded_batches,
    unfinished_batches,
)
from models.db import session_scope, utcnow
from scheduler.runs import LOST_MESSAGE_GRACE_S, held_task_args
from scheduler.strict_json import StrictJSONError, strict_loads

CSV_COLUMNS = ("action", "user_id", "group_id")
COLUMNS = frozenset(CSV_COLUMNS)
USER_ID_COLUMN = "user_id"
JSON_LINES_SUFFIXES = frozenset({".jsonl", ".ndjson"})
CSV_SUFFIX = ".csv"
# Excel and PowerShell's Export-Csv start UTF-8 files with a byte-order mark.
FILE_ENCODING = "utf-8-sig"
# A row is three short fields, about 80 characters. A line longer than this is no row, and is
# never read whole: a file of one 1 GB line must not take 1 GB of memory.
MAX_LINE_CHARS = 4096
# What is read at once while skipping the rest of a line too long to be a row.
SKIP_CHUNK_CHARS = 64 * 1024
# Refused lines and repeated rows listed by line (the lowest lines); the rest only counted, so
# that a file of a million bad lines makes neither a million-entry answer nor its memory.
MAX_LISTED_LINES = 1000
# An Entra object id in its canonical form; ASCII only, as uuid.UUID reads it.
GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.ASCII | re.I)
ACTIONS = frozenset(action.value for action in ItemAction)
# A batch committed this long ago and still not queued is stranded: its submitter died.
STRANDED_BATCH_GRACE_S = 60.0
STRANDED_BATCHES_PER_PASS = 100


class BatchFileError(ValueError):
    """Raised when a batch or members file cannot be read as a whole (format, header, size)."""


class InvalidRowsError(BatchFileError):
    """Raised when a file has invalid rows and they were not to be skipped: nothing is stored."""

    def __init__(self, problems: list[Problem], count: int) -> None:
        super().__init__(f"{count} invalid row(s)")
        self.problems = problems
        self.count = count


class _LineTooLongError(Exception):
    """Raised when a line of a file is longer than any row; the rest of it has been skipped."""

    def __init__(self, line: int) -> None:
        super().__init__(f"longer than {MAX_LINE_CHARS} characters")
        self.line = line


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


Listed = TypeVar("Listed", Problem, Duplicate)


class ByLine(Generic[Listed]):
    """The entries of the lowest lines, at most `limit`, and how many there were in all."""

    def __init__(self, limit: int = MAX_LISTED_LINES) -> None:
        self._limit = limit
        self._heap: list[tuple[int, int, Listed]] = []
        self.count = 0

    def add(self, entry: Listed) -> None:
        self.count += 1
        # A max-heap by line (negated): the highest line goes first when there are too many.
        heapq.heappush(self._heap, (-entry.line, -self.count, entry))
        if len(self._heap) > self._limit:
            heapq.heappop(self._heap)

    def listed(self) -> list[Listed]:
        """The entries kept, in line order."""
        return [entry for _, _, entry in sorted(self._heap, reverse=True)]


@dataclass
class ParsedBatch:
    """The valid rows of a file, its refused lines and the repeated rows dropped."""

    items: list[NewItem] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)
    problem_count: int = 0
    duplicate_count: int = 0


@dataclass(frozen=True)
class MemberList:
    """The user ids of a members file, and its refused lines (the first listed, all counted)."""

    user_ids: list[str]
    problems: list[Problem]
    problem_count: int


@dataclass(frozen=True)
class SubmittedFile:
    """A batch stored from a file, with the lines it skipped and the repeated rows it dropped."""

    batch_id: str
    skipped: list[Problem]
    skipped_count: int
    duplicates: list[Duplicate]
    duplicate_count: int


def is_guid(value: str) -> bool:
    """Whether `value` is a GUID in its canonical 8-4-4-4-12 form, as Entra object ids are."""
    return GUID.fullmatch(value) is not None


def _too_many_rows(max_rows: int) -> BatchFileError:
    return BatchFileError(
        f"the file has more than {max_rows} rows, the most a batch may hold "
        f"(ENTRAFLOW_BATCH_MAX_ROWS); split it, or raise the setting"
    )


class _Lines:
    """The numbered lines of a text file, each read in bounded memory, without their newline.

    A line longer than `MAX_LINE_CHARS` raises `_LineTooLongError` once its rest has been skipped;
    the next line is read as usual after it (a class, not a generator, so that it goes on).
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.number = 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        # Two more than a row may hold: the newline, and one to see the line is too long.
        line = self._read(MAX_LINE_CHARS + 2)
        if not line:
            raise StopIteration
        self.number += 1
        ended = line.endswith("\n")
        if len(line) - (1 if ended else 0) <= MAX_LINE_CHARS:
            return line[:-1] if ended else line
        while not ended:
            rest = self._read(SKIP_CHUNK_CHARS)
            ended = not rest or rest.endswith("\n")
        raise _LineTooLongError(self.number)

    def _read(self, limit: int) -> str:
        try:
            return self._stream.readline(limit)
        except UnicodeDecodeError as exc:
            # Text is decoded ahead of the lines read: the error names no line reliably.
            raise BatchFileError(f"the file is not UTF-8 text: {exc}") from exc


@contextmanager
def _open_text(path: Path) -> Iterator[TextIO]:
    try:
        # Universal newlines: every line, however it ended, ends with "\n" here.
        with path.open(encoding=FILE_ENCODING) as stream:
            yield stream
    except OSError as exc:
        raise BatchFileError(f"cannot read {path}: {exc}") from exc


def _starts_with_brace(stream: TextIO) -> bool:
    """Whether the first character that is not white space is `{`; the stream is rewound."""
    try:
        while chunk := stream.read(SKIP_CHUNK_CHARS):
            text = chunk.lstrip()
            if text:
                return text.startswith("{")
        return False
    except UnicodeDecodeError as exc:
        raise BatchFileError(f"the file is not UTF-8 text: {exc}") from exc
    finally:
        stream.seek(0)


class BatchFileReader:
    """Reads a batch file row by row: its valid rows as they come, and what was wrong with it.

    Rows are not held: memory stays the same for ten rows or a million. Rows repeating an earlier
    one are not found here (that needs every row); `repeated` takes them from whoever found them.
    """

    def __init__(self, path: Path, *, max_rows: int) -> None:
        self.path = path
        self.max_rows = max_rows
        self.problems: ByLine[Problem] = ByLine()
        self.duplicates: ByLine[Duplicate] = ByLine()
        # Valid rows read so far, repeated ones included.
        self.valid = 0

    def items(self) -> Iterator[NewItem]:
        """The valid rows of the file, in file order, repeated ones included."""
        with _open_text(self.path) as stream:
            suffix = self.path.suffix.lower()
            json_lines = suffix in JSON_LINES_SUFFIXES or (
                suffix != CSV_SUFFIX and _starts_with_brace(stream)
            )
            yield from self.items_of(stream, json_lines=json_lines)

    def items_of(self, stream: TextIO, *, json_lines: bool) -> Iterator[NewItem]:
        """The valid rows of an open text stream, CSV or JSON lines."""
        records = _json_records(stream) if json_lines else _csv_records(stream)
        rows = 0
        for line, record in records:
            rows += 1
            if rows > self.max_rows:
                raise _too_many_rows(self.max_rows)
            item = _item(line, record) if isinstance(record, dict) else record
            if isinstance(item, NewItem):
                self.valid += 1
                yield item
            else:
                self.problems.add(Problem(line, item))
        if rows == 0:
            raise BatchFileError("the file has no rows")

    def repeated(
        self, line: int, action: ItemAction, first_line: int, first_action: ItemAction
    ) -> None:
        """Note a row naming the membership of an earlier row: a duplicate, or a contradiction."""
        if action == first_action:
            self.duplicates.add(Duplicate(line, first_line))
        else:
            # Chunks run in parallel, so the order of the two rows could not be kept.
            message = f"{action} contradicts the {first_action} on line {first_line}"
            self.problems.add(Problem(line, message))


def read_batch_file(path: Path, *, max_rows: int | None = None) -> ParsedBatch:
    """Every row of a CSV (`action,user_id,group_id`) or JSON lines file, held in memory.

    For what needs every row at hand (a dry run's plan); submitting streams the file instead.
    """
    reader = BatchFileReader(path, max_rows=max_rows or get_settings().batch_max_rows)
    return _in_memory(reader, reader.items())


def _in_memory(reader: BatchFileReader, rows: Iterable[NewItem]) -> ParsedBatch:
    seen: dict[tuple[str, str], tuple[int, ItemAction]] = {}
    items: list[NewItem] = []
    for item in rows:
        earlier = seen.get((item.user_id, item.group_id))
        if earlier is not None:
            reader.repeated(item.line, item.action, *earlier)
            continue
        seen[(item.user_id, item.group_id)] = (item.line, item.action)
        items.append(item)
    return ParsedBatch(
        items=items,
        problems=reader.problems.listed(),
        duplicates=reader.duplicates.listed(),
        problem_count=reader.problems.count,
        duplicate_count=reader.duplicates.count,
    )


def parse_csv(text: str) -> ParsedBatch:
    """Rows of a CSV text with the header `action,user_id,group_id` (any column order)."""
    return _parse_text(text, json_lines=False)


def parse_json_lines(text: str) -> ParsedBatch:
    """Rows of a JSON lines text: one `{"action", "user_id", "group_id"}` object a line."""
    return _parse_text(text, json_lines=True)


def _parse_text(text: str, *, json_lines: bool) -> ParsedBatch:
    reader = BatchFileReader(Path("-"), max_rows=get_settings().batch_max_rows)
    # newline=None: universal newlines, as a file is read.
    stream = io.StringIO(text, newline=None)
    return _in_memory(reader, reader.items_of(stream, json_lines=json_lines))


Record = tuple[int, dict[str, object] | str]


def _csv_records(stream: TextIO) -> Iterator[Record]:
    """(line, record) for each CSV row after the header, or (line, why it is no record)."""
    lines = _Lines(stream)
    try:
        first = next(lines, "")
    except _LineTooLongError as exc:
        raise BatchFileError(f"the CSV header is longer than {MAX_LINE_CHARS} characters") from exc
    header = [name.strip().lower() for name in next(csv.reader([first]), [])]
    if sorted(header) != sorted(CSV_COLUMNS):
        raise BatchFileError(
            f"the CSV header must be {','.join(CSV_COLUMNS)}, got {','.join(header) or 'nothing'}"
        )
    for line, fields in _csv_rows(lines):
        if isinstance(fields, str):
            yield line, fields
            continue
        if not fields:
            continue  # a blank line
        if len(fields) > len(header):
            yield line, "more fields than the header"
            continue
        yield line, dict(zip(header, fields, strict=False))


def _csv_rows(lines: _Lines) -> Iterator[tuple[int, list[str] | str]]:
    """(line, fields) for each CSV row of `lines`, or (line, why it is no row); [] is blank."""
    reader = csv.reader(lines, skipinitialspace=True)
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except _LineTooLongError as exc:
            yield exc.line, f"the line is {exc}"
            continue
        except csv.Error as exc:
            yield lines.number, f"not CSV: {exc}"
            continue
        yield lines.number, fields


def _plain_lines(lines: _Lines) -> Iterator[tuple[int, str | Problem]]:
    """(line, text) for each line of `lines`, or (line, the Problem of a line too long)."""
    while True:
        try:
            raw = next(lines)
        except StopIteration:
            return
        except _LineTooLongError as exc:
            yield exc.line, Problem(exc.line, f"the line is {exc}")
            continue
        yield lines.number, raw


def _json_records(stream: TextIO) -> Iterator[Record]:
    """(line, record) for each non-blank JSON line, or (line, why it is no record)."""
    lines = _Lines(stream)
    for line, raw in _plain_lines(lines):
        if isinstance(raw, Problem):
            yield line, raw.message
            continue
        if not raw.strip():
            continue
        try:
            # A line of at most MAX_LINE_CHARS holds no integer past Python's 4,300 digits.
            record = strict_loads(raw)
        except StrictJSONError as exc:
            yield line, f"the line {exc}"
            continue
        if not isinstance(record, dict):
            yield line, "not a JSON object"
            continue
        yield line, record


def _item(line: int, record: dict[str, object]) -> NewItem | str:
    """The row a record asks for, or what is wrong with it."""
    if not COLUMNS.issuperset(record):
        return f"unknown field {sorted(set(record) - COLUMNS)[0]!r}"
    values = (record.get("action"), record.get("user_id"), record.get("group_id"))
    for name, value in zip(CSV_COLUMNS, values, strict=True):
        if not isinstance(value, str) or not value:
            return f"{name} is missing"
    action, user_id, group_id = (str(value).strip() for value in values)
    if action.lower() not in ACTIONS:
        return f"action must be add or remove, got {values[0]!r}"
    if not is_guid(user_id):
        return f"user_id must be an object id (a GUID), got {values[1]!r}"
    if not is_guid(group_id):
        return f"group_id must be an object id (a GUID), got {values[2]!r}"
    return NewItem(line, ItemAction(action.lower()), user_id.lower(), group_id.lower())


def read_member_list(path: Path, *, max_rows: int | None = None) -> MemberList:
    """User ids from a file of one id a line, or a CSV with a `user_id` column; with problems.

    At most `max_rows` ids (the `batch_max_rows` setting): a sync is a batch.
    """
    limit = max_rows or get_settings().batch_max_rows
    user_ids: list[str] = []
    problems: ByLine[Problem] = ByLine()
    with _open_text(path) as stream:
        for line, value in _member_values(stream):
            if value is None:
                continue
            if len(user_ids) + problems.count >= limit:
                raise _too_many_rows(limit)
            if isinstance(value, Problem):
                problems.add(value)
            elif is_guid(value):
                user_ids.append(value.lower())
            else:
                message = f"user_id must be an object id (a GUID), got {value!r}"
                problems.add(Problem(line, message))
    return MemberList(user_ids, problems.listed(), problems.count)


def _member_values(stream: TextIO) -> Iterator[tuple[int, str | Problem | None]]:
    """(line, user id as written) for each line or CSV row; a Problem, or None for a blank."""
    lines = _Lines(stream)
    first = ""
    while not first.strip():
        try:
            first = next(lines)
        except StopIteration:
            return
        except _LineTooLongError as exc:
            raise BatchFileError(f"line {exc.line} is {exc}") from exc
    if "," not in first and first.strip().lower() != USER_ID_COLUMN:
        yield lines.number, first.strip()
        for line, raw in _plain_lines(lines):
            yield line, raw if isinstance(raw, Problem) else (raw.strip() or None)
        return
    header = [name.strip().lower() for name in next(csv.reader([first]), [])]
    if USER_ID_COLUMN not in header:
        raise BatchFileError(f"the CSV has no {USER_ID_COLUMN} column")
    column = header.index(USER_ID_COLUMN)
    for line, fields in _csv_rows(lines):
        if isinstance(fields, str):
            yield line, Problem(line, fields)
        elif not fields:
            yield line, None
        else:
            yield line, (fields[column] if column < len(fields) else "").strip()


def submit_batch(settings: Settings, source: str, items: Sequence[NewItem]) -> str:
    """Store a batch of validated rows, commit, queue it, and return its id."""
    if not items:
        raise BatchStateError("a batch needs at least one row")
    with session_scope(settings.resolved_database_url) as session:
        batch_id = add_batch(session, source, items)
    enqueue_batch(settings, batch_id)
    return batch_id


def submit_batch_file(settings: Settings, path: Path, *, skip_invalid: bool) -> SubmittedFile:
    """Store the rows of a batch file as a batch, streamed in bounded memory, commit, queue it.

    The rows go into the database as they are read, in the one transaction that is rolled back
    if the file turns out to be refused (too many rows, invalid rows not to be skipped, none
    valid): nothing of a refused file is stored. The database finds the repeated rows.
    """
    reader = BatchFileReader(path, max_rows=settings.batch_max_rows)
    with session_scope(settings.resolved_database_url) as session:
        batch_id = add_batch(session, path.name, reader.items())
        # 8 bytes a repeated row, where a list would take four times that.
        repeated = array("q")
        for item in repeated_items(session, batch_id):
            reader.repeated(item.line, item.action, item.first_line, item.first_action)
            repeated.append(item.id)
        if reader.problems.count and not skip_invalid:
            raise InvalidRowsError(reader.problems.listed(), reader.problems.count)
        if reader.valid == len(repeated):
            raise BatchFileError("no valid rows, nothing queued")
        drop_items(session, batch_id, repeated)
    enqueue_batch(settings, batch_id)
    return SubmittedFile(
        batch_id,
        reader.problems.listed(),
        reader.problems.count,
        reader.duplicates.listed(),
        reader.duplicates.count,
    )


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
