"""Batches without workers: parsing, chunk numbering, the chunk task body, and the CLI."""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis
import requests
from click.testing import CliRunner
from sqlmodel import col, func, select

from cli.main import cli
from entraflow import keys
from entraflow.catalogue import BATCH_START_TASK
from entraflow.settings import Settings, get_settings
from harness.stack import sandbox_environment
from models.batch_reports import batch_view, report_rows
from models.batches import BatchItem, ItemAction, NewItem, add_batch, cancel_batch
from models.db import session_scope
from sandbox.app import SandboxApp
from sandbox.config import SandboxConfig
from sandbox.directory import (
    DEMO_GROUPS,
    DEMO_USERS,
    bulk_user_id,
)
from sandbox.server import SandboxServer
from sandbox.transport import IN_PROCESS_URL, SandboxAdapter
from scheduler.batches import (
    enqueue_stranded_batches,
    parse_csv,
    parse_json_lines,
    read_batch_file,
)
from worker.batch_tasks import run_chunk, split_batch
from worker.errors import TransientGraphError
from worker.graph import GraphClient

GRAPH_URL = IN_PROCESS_URL + "/v1.0"
FALCON = DEMO_GROUPS["falcon"].id  # no members
SALES = DEMO_GROUPS["sales"].id  # adele only
ALL_STAFF = DEMO_GROUPS["all-staff"].id  # every bulk user
ADELE = DEMO_USERS["adele"].id
NESTOR = DEMO_USERS["nestor"].id
UNKNOWN = "00000000-0000-4000-8000-00000000dead"
# Above Graph's largest members page (999), so a sync reads several pages.
PAGED_BULK_USERS = 1500


class SandboxTokens:
    def __init__(self, app: SandboxApp) -> None:
        self._app = app

    def token(self, rejected: str | None = None) -> str:
        return self._app.issue_token()


# Retry waits are recorded instead of slept (the conftest fixture).
pytestmark = pytest.mark.usefixtures("no_sleeping")


@pytest.fixture
def app() -> SandboxApp:
    return SandboxApp(SandboxConfig(bulk_users=60))


@pytest.fixture
def client(app: SandboxApp) -> GraphClient:
    session = requests.Session()
    session.mount(IN_PROCESS_URL, SandboxAdapter(app))
    return GraphClient(GRAPH_URL, SandboxTokens(app), session=session)


@pytest.fixture
def graph(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[SandboxServer]:
    """A sandbox over HTTP with paged groups, and the settings pointing the CLI at it."""
    server = SandboxServer(SandboxConfig(bulk_users=PAGED_BULK_USERS)).start()
    for name, value in {
        **sandbox_environment(server),
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield server
    server.stop()
    get_settings.cache_clear()


def csv_text(*rows: tuple[str, str, str], header: str = "action,user_id,group_id") -> str:
    return "\n".join([header, *(",".join(row) for row in rows)]) + "\n"


def store(settings: Settings, rows: Sequence[tuple[ItemAction, str, str]]) -> str:
    items = [NewItem(n, action, user, group) for n, (action, user, group) in enumerate(rows, 2)]
    with session_scope(settings.resolved_database_url) as session:
        return add_batch(session, "test.csv", items)


def run_all(settings: Settings, client: GraphClient, batch_id: str) -> None:
    for chunk in split_batch(settings, batch_id):
        run_chunk(settings, client, batch_id, chunk)


def outcomes_by_line(settings: Settings, batch_id: str) -> dict[int, str | None]:
    return {
        row["line"]: row["outcome"] for row in report_rows(settings.resolved_database_url, batch_id)
    }


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout


def queued_starts(redis_client: redis.Redis) -> list[list[str]]:
    raw = [json.loads(m) for m in redis_client.lrange(keys.BULK_QUEUE, 0, -1)]
    return [json.loads(_body(m))[0] for m in raw if m["headers"]["task"] == BATCH_START_TASK]


def _body(message: dict[str, object]) -> str:
    return base64.b64decode(str(message["body"])).decode()


# --- parsing and validation ---


def test_a_csv_gives_one_item_per_row_with_its_line_and_normalised_ids() -> None:
    parsed = parse_csv(csv_text(("add", ADELE.upper(), FALCON), ("Remove", NESTOR, SALES)))

    assert [(i.line, i.action, i.user_id, i.group_id) for i in parsed.items] == [
        (2, ItemAction.ADD, ADELE, FALCON),
        (3, ItemAction.REMOVE, NESTOR, SALES),
    ]
    assert parsed.problems == []


def test_bad_csv_rows_are_reported_by_line_number() -> None:
    parsed = parse_csv(
        csv_text(
            ("add", ADELE, FALCON),
            ("move", ADELE, SALES),
            ("add", "nestor.wilke@contoso.example", FALCON),
            ("remove", NESTOR, "not-a-group"),
            ("add", NESTOR, ""),
        )
    )

    assert [(p.line, p.message.split(" ")[0]) for p in parsed.problems] == [
        (3, "action"),
        (4, "user_id"),
        (5, "group_id"),
        (6, "group_id"),
    ]
    assert len(parsed.items) == 1


def test_a_csv_without_the_header_is_refused_as_a_whole(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text(f"add,{ADELE},{FALCON}\n")

    code, out = invoke("batch", "submit", str(path), "--json")

    assert code == 1
    assert "header" in json.loads(out)["error"]["message"]


def test_json_lines_are_read_by_extension_or_content_with_bad_lines_reported(
    tmp_path: Path,
) -> None:
    lines = [
        json.dumps({"action": "add", "user_id": ADELE, "group_id": FALCON}),
        "",
        "{not json",
        json.dumps({"action": "remove", "user_id": NESTOR, "group": SALES}),
        json.dumps(["add"]),
    ]
    for name in ("rows.jsonl", "rows.txt"):
        path = tmp_path / name
        path.write_text("\n".join(lines))
        parsed = read_batch_file(path)
        assert [item.line for item in parsed.items] == [1]
        assert [p.line for p in parsed.problems] == [3, 4, 5]
    assert "unknown field 'group'" in parse_json_lines(lines[3]).problems[0].message


def test_repeated_rows_are_collapsed_and_contradicting_rows_refused() -> None:
    parsed = parse_csv(
        csv_text(("add", ADELE, FALCON), ("add", ADELE.upper(), FALCON), ("remove", ADELE, FALCON))
    )

    assert len(parsed.items) == 1
    assert [(d.line, d.duplicate_of) for d in parsed.duplicates] == [(3, 2)]
    assert [(p.line, p.message) for p in parsed.problems] == [
        (4, "remove contradicts the add on line 2")
    ]


def test_invalid_rows_queue_nothing_unless_skipped(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "rows.csv"
    path.write_text(csv_text(("add", ADELE, FALCON), ("add", "bob", FALCON)))

    code, out = invoke("batch", "submit", str(path), "--json")

    assert code == 1
    assert json.loads(out)["error"]["problems"] == [
        {"line": 3, "message": "user_id must be an object id (a GUID), got 'bob'"}
    ]
    assert queued_starts(redis_client) == []
    assert invoke("batch", "list", "--json") == (0, "[]\n")

    code, out = invoke("batch", "submit", str(path), "--json", "--skip-invalid")

    assert code == 0, out
    batch = json.loads(out)
    assert (batch["status"], batch["total"], batch["done"]) == ("queued", 1, 0)
    assert batch["skipped"] == [{"line": 3, "message": json.loads(out)["skipped"][0]["message"]}]
    assert queued_starts(redis_client) == [[batch["id"]]]


# --- chunks and the chunk task body ---


def test_items_are_numbered_by_chunk_once_adds_per_group_by_twenty_removals_by_twenty(
    settings: Settings,
) -> None:
    rows = [(ItemAction.ADD, bulk_user_id(n), FALCON) for n in range(1, 26)]
    rows += [(ItemAction.REMOVE, bulk_user_id(n), ALL_STAFF) for n in range(1, 22)]
    rows += [(ItemAction.ADD, bulk_user_id(n), SALES) for n in range(1, 4)]
    batch_id = store(settings, rows)

    # Falcon's adds are chunks 0-1, Sales's 2, the removals 3-4; they are queued in turns, the
    # first chunk of each group, then the second of each, so no group takes every worker.
    assert split_batch(settings, batch_id) == [0, 2, 3, 1, 4]
    assert split_batch(settings, batch_id) == [0, 2, 3, 1, 4]

    with session_scope(settings.resolved_database_url) as session:
        sizes = session.exec(
            select(BatchItem.chunk, func.count())
            .where(BatchItem.batch_id == batch_id)
            .group_by(col(BatchItem.chunk))
            .order_by(col(BatchItem.chunk))
        ).all()
    assert [size for _, size in sizes] == [20, 5, 3, 20, 1]


def test_a_batch_ends_succeeded_with_every_success_outcome(
    settings: Settings, app: SandboxApp, client: GraphClient
) -> None:
    app.directory.add_member(FALCON, bulk_user_id(3))
    batch_id = store(
        settings,
        [
            *((ItemAction.ADD, bulk_user_id(n), FALCON) for n in range(1, 5)),
            (ItemAction.REMOVE, ADELE, SALES),
            (ItemAction.REMOVE, NESTOR, SALES),
        ],
    )

    run_all(settings, client, batch_id)

    view = batch_view(settings.resolved_database_url, batch_id)
    assert view is not None
    assert (view["status"], view["total"], view["done"], view["eta_s"]) == ("succeeded", 6, 6, 0.0)
    assert view["outcomes"] == {"added": 3, "already_member": 1, "not_member": 1, "removed": 1}
    assert outcomes_by_line(settings, batch_id) == {
        2: "added", 3: "added", 4: "already_member", 5: "added", 6: "removed", 7: "not_member"
    }  # fmt: skip
    assert set(app.directory.members(FALCON)) == {bulk_user_id(n) for n in range(1, 5)}
    assert app.directory.members(SALES) == []


def test_not_found_forbidden_and_failed_rows_fail_the_batch_with_graphs_error(
    settings: Settings, app: SandboxApp, client: GraphClient
) -> None:
    app.add_fault(rf"^/v1\.0/groups/{SALES}$", method="PATCH", status=403)
    app.add_fault(rf"^/v1\.0/groups/{ALL_STAFF}$", method="PATCH", status=400, code="Odd")
    batch_id = store(
        settings,
        [
            (ItemAction.ADD, UNKNOWN, FALCON),
            (ItemAction.ADD, NESTOR, SALES),
            (ItemAction.ADD, NESTOR, ALL_STAFF),
            (ItemAction.REMOVE, ADELE, UNKNOWN),
        ],
    )

    run_all(settings, client, batch_id)

    view = batch_view(settings.resolved_database_url, batch_id)
    assert view is not None and view["status"] == "failed"
    assert view["outcomes"] == {"failed": 1, "forbidden": 1, "not_found": 2}
    report = {row["line"]: row for row in report_rows(settings.resolved_database_url, batch_id)}
    assert (report[2]["outcome"], report[2]["code"]) == ("not_found", "Request_ResourceNotFound")
    assert (report[3]["outcome"], report[3]["code"]) == ("forbidden", "Authorization_RequestDenied")
    assert (report[4]["outcome"], report[4]["code"]) == ("failed", "Odd")
    assert all(report[line]["request_id"] for line in (2, 3, 4, 5))


def test_a_chunk_run_again_skips_recorded_rows(
    settings: Settings, app: SandboxApp, client: GraphClient
) -> None:
    batch_id = store(settings, [(ItemAction.ADD, bulk_user_id(n), FALCON) for n in range(1, 4)])
    [chunk] = split_batch(settings, batch_id)
    first = run_chunk(settings, client, batch_id, chunk)
    requests_before = app.stats()["requests_total"]

    again = run_chunk(settings, client, batch_id, chunk)

    assert (first.applied, again.applied) == (3, 0)
    assert app.stats()["requests_total"] == requests_before
    assert set(outcomes_by_line(settings, batch_id).values()) == {"added"}
    audited = CliRunner().invoke(cli, ["audit", "--batch", batch_id, "--json"])
    entries = json.loads(audited.output)
    assert sorted((e["user_id"], e["outcome"], e["changed"]) for e in entries) == sorted(
        (bulk_user_id(n), "added", True) for n in range(1, 4)
    )


def test_a_long_throttle_escapes_the_chunk_for_a_queue_retry_and_records_nothing(
    settings: Settings, app: SandboxApp, client: GraphClient
) -> None:
    app.add_fault(r"^/v1\.0/groups/", method="PATCH", status=429, retry_after="60", count=1)
    batch_id = store(settings, [(ItemAction.ADD, NESTOR, FALCON)])
    [chunk] = split_batch(settings, batch_id)

    with pytest.raises(TransientGraphError) as raised:
        run_chunk(settings, client, batch_id, chunk)

    assert raised.value.retry_after_s == pytest.approx(60, abs=1)
    view = batch_view(settings.resolved_database_url, batch_id)
    assert view is not None and (view["status"], view["done"]) == ("running", 0)
    run_chunk(settings, client, batch_id, chunk)
    assert outcomes_by_line(settings, batch_id) == {2: "added"}


def test_a_chunk_graph_keeps_failing_ends_its_rows_failed_instead_of_retrying_forever(
    settings: Settings, app: SandboxApp, client: GraphClient
) -> None:
    app.add_fault(r"^/v1\.0/groups/", method="PATCH", status=503)
    batch_id = store(settings, [(ItemAction.ADD, NESTOR, FALCON)])
    [chunk] = split_batch(settings, batch_id)
    for _ in range(settings.max_step_deliveries):
        with pytest.raises(TransientGraphError):
            run_chunk(settings, client, batch_id, chunk)

    run_chunk(settings, client, batch_id, chunk)

    report = list(report_rows(settings.resolved_database_url, batch_id))
    assert [(r["outcome"], r["message"]) for r in report] == [
        ("failed", f"tried {settings.max_step_deliveries} times without finishing")
    ]
    view = batch_view(settings.resolved_database_url, batch_id)
    assert view is not None and view["status"] == "failed"


def test_cancelled_rows_never_attempted_end_cancelled_and_their_chunks_do_nothing(
    settings: Settings, app: SandboxApp, client: GraphClient
) -> None:
    rows = [(ItemAction.ADD, bulk_user_id(n), FALCON) for n in range(1, 26)]
    batch_id = store(settings, rows)
    first, second = split_batch(settings, batch_id)
    run_chunk(settings, client, batch_id, first)

    cancel_batch(settings.resolved_database_url, batch_id)
    run_chunk(settings, client, batch_id, second)

    view = batch_view(settings.resolved_database_url, batch_id)
    assert view is not None
    assert (view["status"], view["done"]) == ("cancelled", 25)
    assert view["outcomes"] == {"added": 20, "cancelled": 5}
    assert len(app.directory.members(FALCON)) == 20


# --- the CLI ---


def test_show_report_cancel_and_resume_through_the_cli(
    settings: Settings,
    redis_client: redis.Redis,
    app: SandboxApp,
    client: GraphClient,
    tmp_path: Path,
) -> None:
    path = tmp_path / "rows.csv"
    path.write_text(csv_text(*(("add", bulk_user_id(n), FALCON) for n in range(1, 26))))
    code, out = invoke("batch", "submit", str(path), "--json")
    assert code == 0, out
    batch_id = json.loads(out)["id"]
    first, _ = split_batch(settings, batch_id)
    run_chunk(settings, client, batch_id, first)

    code, out = invoke("batch", "show", batch_id, "--json")
    shown = json.loads(out)
    assert code == 0
    assert {k: shown[k] for k in ("id", "status", "total", "done", "outcomes")} == {
        "id": batch_id, "status": "running", "total": 25, "done": 20, "outcomes": {"added": 20}
    }  # fmt: skip
    assert shown["rate_per_s"] > 0 and shown["eta_s"] >= 0

    redis_client.flushdb()  # the chunk messages are lost
    code, out = invoke("batch", "resume", batch_id, "--json")
    assert code == 0, out
    assert queued_starts(redis_client) == [[batch_id]]

    code, out = invoke("batch", "cancel", batch_id, "--json")
    assert code == 0, out
    assert json.loads(out)["outcomes"] == {"added": 20, "cancelled": 5}
    assert invoke("batch", "cancel", batch_id)[0] == 1
    assert invoke("batch", "resume", batch_id)[0] == 1

    report_path = tmp_path / "report.csv"
    code, _ = invoke("batch", "report", batch_id, "--output", str(report_path))
    assert code == 0
    report = list(csv.DictReader(io.StringIO(report_path.read_text())))
    assert list(report[0]) == [
        "line", "action", "user_id", "group_id", "outcome", "code", "message", "request_id"
    ]  # fmt: skip
    assert [row["line"] for row in report] == [str(n) for n in range(2, 27)]
    assert [row["outcome"] for row in report] == ["added"] * 20 + ["cancelled"] * 5
    assert report[0]["request_id"]

    code, out = invoke("batch", "list", "--json")
    assert [b["id"] for b in json.loads(out)] == [batch_id]
    assert invoke("batch", "show", "no-such-batch", "--json")[0] == 1


def test_a_dry_run_prints_the_plan_and_stores_nothing(
    graph: SandboxServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "rows.csv"
    path.write_text(
        csv_text(
            ("add", ADELE, SALES), ("add", NESTOR, SALES), ("remove", bulk_user_id(1), ALL_STAFF)
        )
    )

    code, out = invoke("batch", "submit", str(path), "--dry-run", "--json")

    assert code == 0, out
    plan = json.loads(out)
    assert (plan["dry_run"], plan["total"], plan["changes"], plan["unchanged"]) == (True, 3, 2, 1)
    assert [row["outcome"] for row in plan["rows"]] == ["already_member", "added", "removed"]
    assert invoke("batch", "list", "--json") == (0, "[]\n")
    assert queued_starts(redis_client) == []
    assert graph.app.stats()["writes_applied"] == 0


def test_max_changes_refuses_a_batch_that_would_change_more(
    graph: SandboxServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "rows.csv"
    path.write_text(
        csv_text(("add", ADELE, SALES), ("add", NESTOR, SALES), ("add", NESTOR, FALCON))
    )

    code, out = invoke("batch", "submit", str(path), "--max-changes", "1", "--json")

    assert code == 1
    assert json.loads(out)["error"] | {"message": ""} == {
        "outcome": "too_many_changes", "message": "", "changes": 2, "max_changes": 1
    }  # fmt: skip
    assert queued_starts(redis_client) == []

    code, out = invoke("batch", "submit", str(path), "--max-changes", "2", "--json")
    assert code == 0, out
    assert queued_starts(redis_client) == [[json.loads(out)["id"]]]


def test_group_sync_reads_every_page_and_submits_the_adds_and_removes(
    graph: SandboxServer, settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    # Keep all bulk users but the first ten, and add two demo users.
    wanted = [bulk_user_id(n) for n in range(11, PAGED_BULK_USERS + 1)] + [ADELE, NESTOR]
    members = tmp_path / "members.csv"
    members.write_text("user_id,name\n" + "".join(f"{u},someone\n" for u in wanted))
    current = set(graph.app.directory.members(ALL_STAFF))

    code, out = invoke("group", "sync", ALL_STAFF, "--members", str(members), "--dry-run", "--json")

    assert code == 0, out
    plan = json.loads(out)
    expected_removes = current - set(wanted)
    assert set(plan["remove"]) == expected_removes
    assert {bulk_user_id(n) for n in range(1, 11)} <= expected_removes
    assert plan["add"] == [] if ADELE in current and NESTOR in current else plan["add"]
    assert plan["unchanged"] == len(current & set(wanted))
    assert graph.app.stats()["requests"]["GET"]["members"] >= 2  # paged

    assert (
        invoke("group", "sync", ALL_STAFF, "--members", str(members), "--max-changes", "3")[0] == 1
    )
    assert queued_starts(redis_client) == []

    code, out = invoke("group", "sync", ALL_STAFF, "--members", str(members), "--json")
    assert code == 0, out
    batch = json.loads(out)
    assert batch["total"] == len(plan["add"]) + len(plan["remove"])
    assert batch["sync"]["removes"] == len(expected_removes)
    assert queued_starts(redis_client) == [[batch["id"]]]


def test_group_sync_refuses_a_member_list_with_a_bad_line(
    graph: SandboxServer, tmp_path: Path
) -> None:
    members = tmp_path / "members.txt"
    members.write_text(f"{ADELE}\nnestor\n")

    code, out = invoke("group", "sync", SALES, "--members", str(members), "--json")

    assert code == 1
    assert json.loads(out)["error"]["problems"][0]["line"] == 2


def test_a_batch_whose_submitter_died_before_queuing_it_is_queued_by_the_scheduler(
    settings: Settings, redis_client: redis.Redis
) -> None:
    batch_id = store(settings, [(ItemAction.ADD, NESTOR, FALCON)])

    assert enqueue_stranded_batches(settings, grace_s=3600) == []
    assert enqueue_stranded_batches(settings, grace_s=0) == [batch_id]
    assert enqueue_stranded_batches(settings, grace_s=0) == []
    assert queued_starts(redis_client) == [[batch_id]]
