"""Batches through real worker processes, a real Redis and the sandbox over HTTP."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from entraflow import process_info
from entraflow.settings import Settings
from harness.stack import LocalStack
from harness.waiting import wait_until
from models.batch_reports import batch_view, report_rows
from sandbox.config import SandboxConfig
from sandbox.directory import DEMO_GROUPS, bulk_user_id
from sandbox.server import SandboxServer

pytestmark = pytest.mark.integration

FALCON = DEMO_GROUPS["falcon"].id  # no members
ALL_STAFF = DEMO_GROUPS["all-staff"].id  # every bulk user
BULK_USERS = 600
BATCH_TIMEOUT_S = 90.0
# Short, so the chunks a killed worker held come back soon instead of after five minutes.
VISIBILITY_TIMEOUT_S = 5
# Slows each Graph request so that a worker can be killed in the middle of the batch.
SLOW_GRAPH_S = 0.1


def bulk_stack(settings: Settings, config: SandboxConfig) -> LocalStack:
    return LocalStack(
        home=settings.home,
        redis_url=settings.redis_url,
        database_url=settings.database_url,
        concurrency=2,
        sandbox=SandboxServer(config),
    )


@pytest.fixture
def stack(settings: Settings) -> Iterator[LocalStack]:
    with bulk_stack(settings, SandboxConfig(bulk_users=BULK_USERS)) as local:
        yield local


def write_rows(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.write_text("action,user_id,group_id\n" + "".join(f"{a},{u},{g}\n" for a, u, g in rows))
    return path


def wait_for_end(database_url: str, batch_id: str) -> dict[str, object]:
    def final_view() -> dict[str, object] | None:
        view = batch_view(database_url, batch_id)
        ended = view is not None and view["status"] in ("succeeded", "failed", "cancelled")
        return view if ended else None

    return wait_until(final_view, f"batch {batch_id} to end", timeout_s=BATCH_TIMEOUT_S)


def test_a_batch_of_500_rows_ends_with_every_row_an_outcome_and_the_groups_as_asked(
    stack: LocalStack, tmp_path: Path
) -> None:
    adds = [("add", bulk_user_id(n), FALCON) for n in range(1, 401)]
    removes = [("remove", bulk_user_id(n), ALL_STAFF) for n in range(1, 101)]
    path = write_rows(tmp_path / "rows.csv", adds + removes)

    result = CliRunner().invoke(cli, ["batch", "submit", str(path), "--wait", "--json"])

    assert result.exit_code == 0, result.output
    batch = json.loads(result.stdout)
    assert (batch["status"], batch["total"], batch["done"]) == ("succeeded", 500, 500)
    assert batch["outcomes"] == {"added": 400, "removed": 100}
    directory = stack.sandbox.app.directory
    assert set(directory.members(FALCON)) == {bulk_user_id(n) for n in range(1, 401)}
    assert not {bulk_user_id(n) for n in range(1, 101)} & set(directory.members(ALL_STAFF))
    stats = stack.sandbox.app.stats()
    assert (stats["members_added"], stats["members_removed"]) == (400, 100)
    # Twenty members to a PATCH, twenty removals to a $batch.
    assert stats["requests"]["PATCH"]["group_update"] == 20
    assert stats["requests"]["POST"]["batch"] == 5


def test_a_worker_killed_mid_batch_loses_no_row_and_applies_none_twice(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENTRAFLOW_VISIBILITY_TIMEOUT_S", str(VISIBILITY_TIMEOUT_S))
    config = SandboxConfig(bulk_users=BULK_USERS, latency_s=SLOW_GRAPH_S)
    rows = [("add", bulk_user_id(n), FALCON) for n in range(1, BULK_USERS + 1)]
    path = write_rows(tmp_path / "rows.csv", rows)
    with bulk_stack(settings, config) as stack:
        result = CliRunner().invoke(cli, ["batch", "submit", str(path), "--json"])
        assert result.exit_code == 0, result.output
        batch_id = json.loads(result.stdout)["id"]
        database_url = stack.settings.resolved_database_url
        while (batch_view(database_url, batch_id) or {}).get("done", 0) < BULK_USERS // 10:
            time.sleep(0.02)

        [worker] = stack.worker_processes
        for pid in [worker.pid, *process_info.children(worker.pid)]:
            os.kill(pid, signal.SIGKILL)
        worker.wait()
        done_at_kill = batch_view(database_url, batch_id)["done"]  # type: ignore[index]
        stack.worker_processes.clear()
        # A worker restores the messages unacknowledged for longer than the visibility timeout
        # when it starts (and every 100 s after, Kombu's default sweep).
        time.sleep(VISIBILITY_TIMEOUT_S + 1)
        stack.start_worker()

        batch = wait_for_end(database_url, batch_id)

        assert done_at_kill < BULK_USERS
        assert (batch["status"], batch["done"]) == ("succeeded", BULK_USERS), batch
        outcomes = {row["outcome"] for row in report_rows(database_url, batch_id)}
        # A row applied but not recorded when the worker died answers already_member again.
        assert outcomes <= {"added", "already_member"}
        assert set(stack.sandbox.app.directory.members(FALCON)) == {
            bulk_user_id(n) for n in range(1, BULK_USERS + 1)
        }
        assert stack.sandbox.app.stats()["members_added"] == BULK_USERS
