"""`entraflow runs list` and `runs show` over a recorded history."""

from __future__ import annotations

import json
from datetime import timedelta

from click.testing import CliRunner
from sqlmodel import select

from cli.main import cli
from entraflow.settings import Settings
from models.db import session_scope
from models.runs import FlowRun, RunStatus, utcnow
from scheduler.runs import create_run

STEPS = [{"id": "user", "action": "lookup_user", "with": {"upn": "a@b.example"}}]


def record(settings: Settings, flow: str, status: RunStatus, age: timedelta) -> str:
    run_id = create_run(settings, flow, STEPS, {"id": f"e-{flow}-{status}", "source": "t"})
    with session_scope(settings.resolved_database_url) as session:
        run = session.exec(select(FlowRun).where(FlowRun.id == run_id)).one()
        run.status = status
        run.created_at = utcnow() - age
    return run_id


def runs_json(*args: str) -> list[dict[str, object]]:
    result = CliRunner().invoke(cli, ["runs", "list", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)  # type: ignore[no-any-return]


def test_runs_list_filters_by_flow_status_and_age_newest_first(settings: Settings) -> None:
    old = record(settings, "joiners", RunStatus.SUCCEEDED, timedelta(days=3))
    failed = record(settings, "joiners", RunStatus.FAILED, timedelta(hours=1))
    other = record(settings, "leavers", RunStatus.SUCCEEDED, timedelta(minutes=5))

    assert [r["id"] for r in runs_json()] == [other, failed, old]
    assert [r["id"] for r in runs_json("--flow", "joiners")] == [failed, old]
    assert [r["id"] for r in runs_json("--status", "failed")] == [failed]
    assert [r["id"] for r in runs_json("--since", "2h")] == [other, failed]
    assert [r["id"] for r in runs_json("--limit", "1")] == [other]
    assert set(runs_json()[0]) >= {"id", "flow", "status", "event_id"}


def test_runs_list_refuses_a_since_it_cannot_read(settings: Settings) -> None:
    result = CliRunner().invoke(cli, ["runs", "list", "--since", "yesterday-ish"])
    assert result.exit_code != 0
    assert "duration like 30m" in result.output


def test_runs_list_prints_a_table_for_people(settings: Settings) -> None:
    run_id = record(settings, "joiners", RunStatus.QUEUED, timedelta(0))
    result = CliRunner().invoke(cli, ["runs", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert run_id in result.output and "joiners" in result.output


def test_runs_show_gives_the_steps_and_fails_clearly_for_an_unknown_run(settings: Settings) -> None:
    run_id = record(settings, "joiners", RunStatus.QUEUED, timedelta(0))
    result = CliRunner().invoke(cli, ["runs", "show", run_id, "--json"])
    shown = json.loads(result.output)
    assert shown["id"] == run_id and shown["status"] == "queued"
    assert [set(step) >= {"id", "action", "status", "attempts", "output", "error"}
            for step in shown["steps"]] == [True]  # fmt: skip

    missing = CliRunner().invoke(cli, ["runs", "show", "no-such-run", "--json"])
    assert missing.exit_code != 0
