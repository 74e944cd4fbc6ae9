"""Bulk membership changes over a `GraphClient`: rows in, one outcome per row out.

Adds to one group go out as `PATCH /groups/{gid}` binding up to 20 members. Graph applies such a
PATCH all or nothing, so a chunk refused because a member is already there or does not exist is
split in halves until every row has its own answer. Removals go out as `$batch` requests of up
to 20 `DELETE .../members/{uid}/$ref`, each part answered on its own; parts throttled or failed
transiently are sent again after their `Retry-After`, because no SDK retries `$batch` parts.

Every outcome is idempotent. A write that failed ambiguously (a 5xx, 429 or timeout that Graph
may have applied anyway) is simply sent again: Graph then answers "already a member" or "not a
member", so a chunk run twice, after a crash or such a write, ends in the same memberships and
reports `already_member` / `not_member` where the first run had made the change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from worker.actions import SELECT_ID
from worker.addressing import (
    directory_object_url,
    group_path,
    member_ref_path,
    require_guid,
    user_path,
)
from worker.budget import (
    BATCH_PATH,
    MAX_BATCH_REQUESTS,
    MAX_MEMBERS_PER_PATCH,
    MEMBERS_BIND_KEY,
    PRIORITY_HEADER,
    Priority,
)
from worker.errors import (
    AlreadyMemberError,
    AuthenticationError,
    BadRequestError,
    ForbiddenError,
    GraphError,
    InvalidInputError,
    NotFoundError,
    PermanentGraphError,
    ServiceUnavailableError,
    TransientGraphError,
    error_from_answer,
)
from worker.graph import FIRST_NON_SUCCESS_STATUS, GraphClient
from worker.retry import RetryPolicy

# Bulk work lets interactive requests go first, at Graph as in our own budget.
BULK_HEADERS = {PRIORITY_HEADER: Priority.LOW.value}
# The largest page Graph serves when listing members.
MEMBERS_PAGE_SIZE = 999
MEMBERS_QUERY = {"$select": "id", "$top": str(MEMBERS_PAGE_SIZE)}

RowId = int | str


class RowAction(StrEnum):
    """What a row asks for."""

    ADD = "add"
    REMOVE = "remove"


class Outcome(StrEnum):
    """How a row ended."""

    ADDED = "added"
    ALREADY_MEMBER = "already_member"
    REMOVED = "removed"
    NOT_MEMBER = "not_member"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    FAILED = "failed"


# The outcomes that change a membership.
CHANGES = frozenset({Outcome.ADDED, Outcome.REMOVED})


@dataclass(frozen=True)
class Row:
    """One membership change of a batch."""

    row_id: RowId
    action: RowAction
    user_id: str
    group_id: str


@dataclass(frozen=True)
class RowOutcome:
    """How one row ended, with Graph's status, error code, message and request id."""

    row_id: RowId
    outcome: Outcome
    status: int | None = None
    code: str | None = None
    message: str | None = None
    request_id: str | None = None

    @classmethod
    def of_error(cls, row: Row, outcome: Outcome, error: GraphError) -> RowOutcome:
        """`row` ended as `outcome` because of Graph's `error`."""
        return cls(row.row_id, outcome, error.status, error.code, error.message, error.request_id)

    def to_dict(self) -> dict[str, Any]:
        """The outcome as the JSON object a task stores."""
        return {
            "row_id": self.row_id,
            "outcome": self.outcome.value,
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "request_id": self.request_id,
        }


@dataclass(frozen=True)
class PlannedRow:
    """A row and the outcome applying it now would have."""

    row: Row
    outcome: Outcome

    @property
    def changes(self) -> bool:
        """Whether applying the row would change a membership."""
        return self.outcome in CHANGES


@dataclass(frozen=True)
class Plan:
    """What a batch would change and what is already so, from the current memberships."""

    rows: tuple[PlannedRow, ...]

    @property
    def changes(self) -> list[Row]:
        """The rows that would change a membership."""
        return [planned.row for planned in self.rows if planned.changes]

    @property
    def unchanged(self) -> list[PlannedRow]:
        """The rows that are already so, or cannot be applied."""
        return [planned for planned in self.rows if not planned.changes]


@dataclass(frozen=True)
class SyncPlan:
    """The adds and removes that make a group's direct members equal a list of users."""

    group_id: str
    adds: tuple[str, ...]
    removes: tuple[str, ...]
    unchanged: int


def chunk_rows(rows: Sequence[Row]) -> list[list[Row]]:
    """Rows in the units one request carries: adds per group by 20, removals by 20."""
    return [[rows[index] for index in chunk] for chunk in _chunk_indexes(rows)]


def _chunk_indexes(rows: Sequence[Row]) -> list[list[int]]:
    adds: dict[str, list[int]] = {}
    removals: list[int] = []
    for index, row in enumerate(rows):
        if row.action is RowAction.ADD:
            adds.setdefault(row.group_id.lower(), []).append(index)
        else:
            removals.append(index)
    chunks = [
        group_rows[start : start + MAX_MEMBERS_PER_PATCH]
        for group_rows in adds.values()
        for start in range(0, len(group_rows), MAX_MEMBERS_PER_PATCH)
    ]
    chunks += [
        removals[start : start + MAX_BATCH_REQUESTS]
        for start in range(0, len(removals), MAX_BATCH_REQUESTS)
    ]
    return chunks


def apply_chunk(
    client: GraphClient, rows: Sequence[Row], *, retry_policy: RetryPolicy | None = None
) -> list[RowOutcome]:
    """Apply `rows` and answer their outcomes in the same order; safe to run again.

    `retry_policy` governs the resending of throttled `$batch` parts. A transient error that
    outlasts it (or a wait handed back, `retry_after_s` set) is raised: run the chunk again.
    """
    existence = _Existence(client)
    outcomes: dict[int, RowOutcome] = {}
    for index, row in enumerate(rows):
        try:
            require_guid(row.user_id, "user_id")
            require_guid(row.group_id, "group_id")
        except InvalidInputError as exc:
            outcomes[index] = RowOutcome(row.row_id, Outcome.FAILED, message=exc.message)
    valid = [index for index in range(len(rows)) if index not in outcomes]
    for chunk in _chunk_indexes([rows[index] for index in valid]):
        indexes = [valid[position] for position in chunk]
        chunk_rows = [rows[index] for index in indexes]
        if chunk_rows[0].action is RowAction.ADD:
            answered = _add(client, chunk_rows, existence)
        else:
            answered = _remove(client, chunk_rows, existence, retry_policy or RetryPolicy())
        outcomes.update(zip(indexes, answered, strict=True))
    return [outcomes[index] for index in range(len(rows))]


def _add(client: GraphClient, rows: list[Row], existence: _Existence) -> list[RowOutcome]:
    """Add `rows` (one group) in one PATCH, splitting the chunk while Graph refuses it."""
    group_id = rows[0].group_id
    binds = [directory_object_url(client.graph_url, row.user_id) for row in rows]
    try:
        response = client.request(
            "PATCH", group_path(group_id), json={MEMBERS_BIND_KEY: binds}, headers=BULK_HEADERS
        )
    except AlreadyMemberError as exc:
        if len(rows) == 1:
            return [RowOutcome.of_error(rows[0], Outcome.ALREADY_MEMBER, exc)]
    except NotFoundError as exc:
        if len(rows) == 1 or not existence.exists(group_path(group_id)):
            return [RowOutcome.of_error(row, Outcome.NOT_FOUND, exc) for row in rows]
    except (ForbiddenError, AuthenticationError) as exc:
        # About the app or the group, never one member: splitting would be refused the same way.
        outcome = Outcome.FORBIDDEN if isinstance(exc, ForbiddenError) else Outcome.FAILED
        return [RowOutcome.of_error(row, outcome, exc) for row in rows]
    except BadRequestError as exc:
        if len(rows) == 1:
            return [RowOutcome.of_error(rows[0], Outcome.FAILED, exc)]
    except PermanentGraphError as exc:
        return [RowOutcome.of_error(row, Outcome.FAILED, exc) for row in rows]
    else:
        return [
            RowOutcome(row.row_id, Outcome.ADDED, response.status, request_id=response.request_id)
            for row in rows
        ]
    # Refused for some member: halves find the culprits in a few requests, not one per row.
    middle = len(rows) // 2
    return _add(client, rows[:middle], existence) + _add(client, rows[middle:], existence)


def _remove(
    client: GraphClient, rows: list[Row], existence: _Existence, retry_policy: RetryPolicy
) -> list[RowOutcome]:
    """Remove `rows` in one `$batch`, sending transiently failed parts again until all answer."""
    outcomes: dict[int, RowOutcome] = {}
    pending = list(range(len(rows)))

    def send(retry_number: int) -> None:
        nonlocal pending
        parts = [
            {
                "id": str(index),
                "method": "DELETE",
                "url": member_ref_path(rows[index].group_id, rows[index].user_id),
            }
            for index in pending
        ]
        response = client.request(
            "POST", BATCH_PATH, json={"requests": parts}, headers=BULK_HEADERS
        )
        answers = _batch_answers(response.data)
        transient: list[TransientGraphError] = []
        still_pending = []
        for index in pending:
            error = _part_error(answers.get(str(index)))
            if isinstance(error, TransientGraphError):
                transient.append(error)
                still_pending.append(index)
            else:
                outcomes[index] = _removal_outcome(rows[index], error, existence)
        pending = still_pending
        if transient:
            # The longest Retry-After of the parts, so the next try waits for all of them.
            raise max(transient, key=lambda error: error.retry_after_s or 0.0)

    retry_policy.call(send)
    return [outcomes[index] for index in range(len(rows))]


def _removal_outcome(row: Row, error: GraphError | None, existence: _Existence) -> RowOutcome:
    if error is None:
        return RowOutcome(row.row_id, Outcome.REMOVED, 204)
    if isinstance(error, NotFoundError):
        # Graph answers 404 for a non-member too (GRAPH.md): only a missing object is not_found.
        if existence.exists(group_path(row.group_id)) and existence.exists(user_path(row.user_id)):
            return RowOutcome.of_error(row, Outcome.NOT_MEMBER, error)
        return RowOutcome.of_error(row, Outcome.NOT_FOUND, error)
    if isinstance(error, ForbiddenError):
        return RowOutcome.of_error(row, Outcome.FORBIDDEN, error)
    return RowOutcome.of_error(row, Outcome.FAILED, error)


def _batch_answers(data: Any) -> dict[str, dict[str, Any]]:
    responses = data.get("responses") if isinstance(data, dict) else None
    return {str(part.get("id")): part for part in responses or [] if isinstance(part, dict)}


def _part_error(part: dict[str, Any] | None) -> GraphError | None:
    """The error a `$batch` part answered, through the same mapping as whole responses."""
    if part is None:
        # Graph left the part unanswered: sending it again is what a lost answer calls for.
        return ServiceUnavailableError("the $batch answer has no response for this part")
    status = int(part.get("status", 0))
    if status < FIRST_NON_SUCCESS_STATUS:
        return None
    return error_from_answer(status, part.get("headers") or {}, part.get("body"))


class _Existence:
    """Which groups and users exist, asked of Graph at most once each per chunk."""

    def __init__(self, client: GraphClient) -> None:
        self._client = client
        self._known: dict[str, bool] = {}

    def exists(self, path: str) -> bool:
        if path not in self._known:
            try:
                self._client.request("GET", path, params=SELECT_ID, headers=BULK_HEADERS)
            except NotFoundError:
                self._known[path] = False
            else:
                self._known[path] = True
        return self._known[path]


def current_members(client: GraphClient, group_id: str) -> list[str]:
    """The ids (lowercase) of a group's direct members, in Graph's order, every page read."""
    return [
        str(member["id"]).lower()
        for member in client.get_all(f"{group_path(group_id)}/members", MEMBERS_QUERY)
    ]


def plan(client: GraphClient, rows: Sequence[Row]) -> Plan:
    """What applying `rows` in order would do, from the groups' members now; writes nothing."""
    members: dict[str, set[str] | None] = {}
    planned = []
    for row in rows:
        try:
            require_guid(row.user_id, "user_id")
            group = require_guid(row.group_id, "group_id").lower()
        except InvalidInputError:
            planned.append(PlannedRow(row, Outcome.FAILED))
            continue
        if group not in members:
            try:
                members[group] = set(current_members(client, group))
            except NotFoundError:
                members[group] = None
        planned.append(PlannedRow(row, _planned_outcome(row, members[group])))
    return Plan(tuple(planned))


def _planned_outcome(row: Row, members: set[str] | None) -> Outcome:
    """The outcome of `row` against `members`, which it updates as applying it would."""
    if members is None:
        return Outcome.NOT_FOUND
    user = row.user_id.lower()
    if row.action is RowAction.ADD:
        if user in members:
            return Outcome.ALREADY_MEMBER
        members.add(user)
        return Outcome.ADDED
    if user not in members:
        return Outcome.NOT_MEMBER
    members.discard(user)
    return Outcome.REMOVED


def sync_plan(client: GraphClient, group_id: str, desired_user_ids: Iterable[str]) -> SyncPlan:
    """The adds and removes that make the group's direct members exactly `desired_user_ids`."""
    desired = list(
        dict.fromkeys(require_guid(user_id, "user_id").lower() for user_id in desired_user_ids)
    )
    members = current_members(client, group_id)
    current = set(members)
    wanted = set(desired)
    return SyncPlan(
        group_id=group_id,
        adds=tuple(user_id for user_id in desired if user_id not in current),
        removes=tuple(user_id for user_id in members if user_id not in wanted),
        unchanged=len(current & wanted),
    )
