"""The bulk membership engine against the in-process Graph sandbox: chunks, splits, outcomes."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pytest
import redis
import requests
from sandbox_fixtures import FakeClock

from sandbox.app import SandboxApp
from sandbox.config import SandboxConfig
from sandbox.directory import DEMO_GROUPS, DEMO_USERS, bulk_user_id
from sandbox.transport import IN_PROCESS_URL, SandboxAdapter
from worker import retry
from worker.budget import Budget, Priority, budget_hooks
from worker.bulk import (
    Outcome,
    Row,
    RowAction,
    RowOutcome,
    apply_chunk,
    chunk_rows,
    plan,
    sync_plan,
)
from worker.graph import GraphClient

GRAPH_URL = IN_PROCESS_URL + "/v1.0"
FALCON = DEMO_GROUPS["falcon"]  # starts with no members
SALES = DEMO_GROUPS["sales"]  # adele only
ALL_STAFF = DEMO_GROUPS["all-staff"]  # every demo user but svc and guest, and every bulk user
ADELE = DEMO_USERS["adele"]
NESTOR = DEMO_USERS["nestor"]
UNKNOWN_ID = str(uuid.UUID(int=1))
# Above Graph's largest members page (999), so reading members takes several pages.
PAGED_BULK_USERS = 1500


class SandboxTokens:
    """Access tokens from the sandbox's own token endpoint."""

    def __init__(self, app: SandboxApp) -> None:
        self._app = app
        self._token: str | None = None

    def token(self, rejected: str | None = None) -> str:
        if self._token is None or self._token == rejected:
            self._token = self._app.issue_token()
        return self._token


# Retry waits are recorded instead of slept (the conftest fixture).
pytestmark = pytest.mark.usefixtures("no_sleeping")


@pytest.fixture
def app() -> SandboxApp:
    return SandboxApp(SandboxConfig(bulk_users=60))


def new_client(app: SandboxApp, budget: Budget | None = None) -> GraphClient:
    """A Graph client talking to `app` in process, paying from `budget` as bulk work if given."""
    session = requests.Session()
    session.mount(IN_PROCESS_URL, SandboxAdapter(app))
    before, after = budget_hooks(budget, Priority.LOW) if budget else (None, None)
    return GraphClient(
        GRAPH_URL,
        SandboxTokens(app),
        session=session,
        before_request=before,
        after_response=after,
    )


@pytest.fixture
def client(app: SandboxApp) -> GraphClient:
    return new_client(app)


def rows(action: RowAction, group_id: str, user_ids: Sequence[str]) -> list[Row]:
    return [Row(n, action, user_id, group_id) for n, user_id in enumerate(user_ids, 1)]


def bulk_ids(count: int, first: int = 1) -> list[str]:
    return [bulk_user_id(n) for n in range(first, first + count)]


def outcomes(answered: list[RowOutcome]) -> list[Outcome]:
    return [row.outcome for row in answered]


def patches(app: SandboxApp) -> int:
    count: int = app.stats()["requests"].get("PATCH", {}).get("group_update", 0)
    return count


def test_adds_to_one_group_go_out_twenty_to_a_patch(app: SandboxApp, client: GraphClient) -> None:
    answered = apply_chunk(client, rows(RowAction.ADD, FALCON.id, bulk_ids(41)))

    assert outcomes(answered) == [Outcome.ADDED] * 41
    assert patches(app) == 3
    assert app.directory.members(FALCON.id) == bulk_ids(41)


def test_chunks_hold_twenty_adds_of_one_group_or_twenty_removals() -> None:
    batch = [
        *rows(RowAction.ADD, FALCON.id, bulk_ids(25)),
        *rows(RowAction.REMOVE, ALL_STAFF.id, bulk_ids(21)),
        *rows(RowAction.ADD, SALES.id, bulk_ids(3)),
    ]

    chunks = chunk_rows(batch)

    assert [len(chunk) for chunk in chunks] == [20, 5, 3, 20, 1]
    assert {row.group_id for row in chunks[0] + chunks[1]} == {FALCON.id}


def test_a_chunk_refused_for_one_existing_member_is_split_until_each_row_is_known(
    app: SandboxApp, client: GraphClient
) -> None:
    users = bulk_ids(20)
    app.directory.add_member(FALCON.id, users[7])

    answered = apply_chunk(client, rows(RowAction.ADD, FALCON.id, users))

    expected = [Outcome.ADDED] * 20
    expected[7] = Outcome.ALREADY_MEMBER
    assert outcomes(answered) == expected
    assert answered[7].code == "Request_BadRequest"
    assert set(app.directory.members(FALCON.id)) == set(users)
    # Halving finds the one refused row in far fewer requests than one per row.
    assert patches(app) < 20


def test_a_chunk_refused_for_one_unknown_user_gives_that_row_not_found(
    app: SandboxApp, client: GraphClient
) -> None:
    users = [*bulk_ids(12), UNKNOWN_ID, *bulk_ids(7, first=13)]

    answered = apply_chunk(client, rows(RowAction.ADD, FALCON.id, users))

    assert answered[12] == RowOutcome(
        13, Outcome.NOT_FOUND, 404, "Request_ResourceNotFound", answered[12].message,
        answered[12].request_id,
    )  # fmt: skip
    assert answered[12].request_id
    assert outcomes(answered).count(Outcome.ADDED) == 19
    assert len(app.directory.members(FALCON.id)) == 19


def test_adds_to_a_missing_group_are_not_found_without_splitting(
    app: SandboxApp, client: GraphClient
) -> None:
    answered = apply_chunk(client, rows(RowAction.ADD, UNKNOWN_ID, bulk_ids(20)))

    assert outcomes(answered) == [Outcome.NOT_FOUND] * 20
    assert patches(app) == 1


def test_a_permission_refusal_makes_every_row_forbidden(
    app: SandboxApp, client: GraphClient
) -> None:
    app.add_fault(r"^/v1\.0/groups/[^/]+$", method="PATCH", status=403)

    answered = apply_chunk(client, rows(RowAction.ADD, FALCON.id, bulk_ids(20)))

    assert outcomes(answered) == [Outcome.FORBIDDEN] * 20
    assert answered[0].code == "Authorization_RequestDenied"
    assert patches(app) == 1


def test_an_unexpected_refusal_fails_each_row_with_graphs_error(
    app: SandboxApp, client: GraphClient
) -> None:
    app.add_fault(
        r"^/v1\.0/groups/[^/]+$", method="PATCH", status=400, code="Odd", message="Not today."
    )

    answered = apply_chunk(client, rows(RowAction.ADD, FALCON.id, bulk_ids(2)))

    assert [(row.outcome, row.status, row.code, row.message) for row in answered] == [
        (Outcome.FAILED, 400, "Odd", "Not today.")
    ] * 2
    assert all(row.request_id for row in answered)


def test_rows_with_malformed_ids_fail_before_any_request(
    app: SandboxApp, client: GraphClient
) -> None:
    batch = [Row("a", RowAction.ADD, "not-a-guid", FALCON.id)]
    batch.append(Row("b", RowAction.REMOVE, ADELE.id, "also-not"))

    answered = apply_chunk(client, batch)

    assert outcomes(answered) == [Outcome.FAILED, Outcome.FAILED]
    assert "user_id" in (answered[0].message or "")
    assert app.stats()["requests_total"] == 0


def test_removals_go_out_in_one_batch_with_an_outcome_each(
    app: SandboxApp, client: GraphClient
) -> None:
    batch = [
        Row(1, RowAction.REMOVE, ADELE.id, SALES.id),
        Row(2, RowAction.REMOVE, NESTOR.id, SALES.id),
        Row(3, RowAction.REMOVE, UNKNOWN_ID, SALES.id),
        Row(4, RowAction.REMOVE, ADELE.id, UNKNOWN_ID),
    ]

    answered = apply_chunk(client, batch)

    assert outcomes(answered) == [
        Outcome.REMOVED,
        Outcome.NOT_MEMBER,
        Outcome.NOT_FOUND,
        Outcome.NOT_FOUND,
    ]
    stats = app.stats()
    assert stats["requests"]["POST"]["batch"] == 1
    assert stats["requests"]["DELETE"] == {"member_remove": 4}
    assert stats["users_deleted"] == 0
    assert app.directory.members(SALES.id) == []


def test_a_throttled_part_is_sent_again_after_the_shared_pause(
    redis_client: redis.Redis,
) -> None:
    clock = FakeClock()
    app = SandboxApp(SandboxConfig(bulk_users=20), clock=clock, sleep=clock.sleep)
    app.directory.memberships[FALCON.id].update(dict.fromkeys(bulk_ids(20)))
    app.add_fault(r"/members/[^/]+/\$ref$", method="DELETE", status=429, retry_after="2", count=1)
    budget = Budget(redis_client, app.config.client_id, app.config.tenant_id, clock=clock,
                    sleep=clock.sleep)  # fmt: skip

    answered = apply_chunk(new_client(app, budget), rows(RowAction.REMOVE, FALCON.id, bulk_ids(20)))

    assert outcomes(answered) == [Outcome.REMOVED] * 20
    stats = app.stats()
    assert stats["requests"]["POST"]["batch"] == 2
    assert stats["responses"]["429"] == 1
    # The retry waited Retry-After on the shared clock: Graph saw no request too early.
    assert stats["early_retries"] == 0
    assert retry.recorded_waits_s()[0] >= 2.0


def test_an_add_graph_applied_but_answered_as_failed_ends_as_a_member(
    app: SandboxApp, client: GraphClient
) -> None:
    app.add_fault(r"^/v1\.0/groups/[^/]+$", method="PATCH", status=503, apply_first=True, count=1)

    answered = apply_chunk(client, rows(RowAction.ADD, FALCON.id, bulk_ids(20)))

    # Sent again, the write is refused as already made: a success, and nothing applied twice.
    assert outcomes(answered) == [Outcome.ALREADY_MEMBER] * 20
    assert app.directory.members(FALCON.id) == bulk_ids(20)


def test_a_removal_graph_applied_but_answered_as_failed_ends_removed(
    app: SandboxApp, client: GraphClient
) -> None:
    app.add_fault(r"/members/[^/]+/\$ref$", method="DELETE", status=504, apply_first=True, count=1)

    answered = apply_chunk(client, [Row(1, RowAction.REMOVE, ADELE.id, SALES.id)])

    assert outcomes(answered) == [Outcome.NOT_MEMBER]
    assert app.directory.members(SALES.id) == []


def test_a_chunk_run_again_ends_the_same_with_idempotent_outcomes(
    app: SandboxApp, client: GraphClient
) -> None:
    batch = [
        *rows(RowAction.ADD, FALCON.id, bulk_ids(5)),
        Row(9, RowAction.REMOVE, ADELE.id, SALES.id),
    ]

    first = apply_chunk(client, batch)
    again = apply_chunk(client, batch)

    assert outcomes(first) == [Outcome.ADDED] * 5 + [Outcome.REMOVED]
    assert outcomes(again) == [Outcome.ALREADY_MEMBER] * 5 + [Outcome.NOT_MEMBER]
    assert app.directory.members(FALCON.id) == bulk_ids(5)
    assert app.directory.members(SALES.id) == []


def test_bulk_requests_ask_graph_for_low_priority(app: SandboxApp) -> None:
    session = requests.Session()
    seen: list[str | None] = []
    session.mount(IN_PROCESS_URL, SandboxAdapter(app))
    client = GraphClient(
        GRAPH_URL,
        SandboxTokens(app),
        session=session,
        after_response=lambda response: seen.append(
            response.request.headers.get("x-ms-throttle-priority")
        ),
    )

    apply_chunk(client, [*rows(RowAction.ADD, FALCON.id, bulk_ids(2)),
                         Row(3, RowAction.REMOVE, ADELE.id, SALES.id)])  # fmt: skip

    assert seen == ["Low", "Low"]


def test_a_plan_reads_every_page_of_members_and_writes_nothing() -> None:
    app = SandboxApp(SandboxConfig(bulk_users=PAGED_BULK_USERS))
    batch = [
        Row(1, RowAction.ADD, bulk_user_id(1400), ALL_STAFF.id),
        Row(2, RowAction.ADD, DEMO_USERS["svc"].id, ALL_STAFF.id),
        Row(3, RowAction.REMOVE, bulk_user_id(1500), ALL_STAFF.id),
        Row(4, RowAction.REMOVE, DEMO_USERS["guest"].id, ALL_STAFF.id),
        Row(5, RowAction.ADD, ADELE.id, UNKNOWN_ID),
        Row(6, RowAction.ADD, DEMO_USERS["svc"].id, ALL_STAFF.id),
    ]

    planned = plan(new_client(app), batch)

    assert [row.outcome for row in planned.rows] == [
        Outcome.ALREADY_MEMBER,
        Outcome.ADDED,
        Outcome.REMOVED,
        Outcome.NOT_MEMBER,
        Outcome.NOT_FOUND,
        Outcome.ALREADY_MEMBER,  # the plan counts row 2 as done
    ]
    assert [row.row_id for row in planned.changes] == [2, 3]
    stats = app.stats()
    assert stats["requests"]["GET"]["members"] == 2 + 1  # two pages, and the unknown group
    assert stats["writes_applied"] == 0


def test_a_sync_plan_adds_the_missing_and_removes_the_extra_members() -> None:
    app = SandboxApp(SandboxConfig(bulk_users=PAGED_BULK_USERS))
    desired = [*bulk_ids(1000), DEMO_USERS["svc"].id, DEMO_USERS["guest"].id.upper()]

    synced = sync_plan(new_client(app), ALL_STAFF.id, desired)

    assert synced.adds == (DEMO_USERS["svc"].id, DEMO_USERS["guest"].id)
    extra_demo_users = {user.id for key, user in DEMO_USERS.items() if key not in ("svc", "guest")}
    assert set(synced.removes) == extra_demo_users | set(bulk_ids(500, first=1001))
    assert synced.unchanged == 1000
    assert app.stats()["requests"]["GET"]["members"] == 2


def test_ten_thousand_adds_to_one_group_take_five_hundred_patches() -> None:
    app = SandboxApp(SandboxConfig(bulk_users=10_000))
    client = new_client(app)
    batch = rows(RowAction.ADD, FALCON.id, bulk_ids(10_000))

    answered = [outcome for chunk in chunk_rows(batch) for outcome in apply_chunk(client, chunk)]

    assert outcomes(answered) == [Outcome.ADDED] * 10_000
    assert patches(app) == 500
    assert app.stats()["requests"]["POST"] == {"token": 1}
