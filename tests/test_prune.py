"""Retention: `entraflow runs prune` and the scheduler's automatic pruning."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import redis
from click.testing import CliRunner
from sqlmodel import col, func, select

from cli.main import cli
from entraflow.settings import Settings, get_settings
from models.db import session_scope
from models.flows import AcceptedEvent
from models.runs import FlowRun, RunStatus, StepRun, utcnow
from scheduler.intake import Scheduler
from scheduler.runs import create_run

STEPS = [
    {"id": "user", "action": "lookup_user", "with": {"upn": "a@b.example"}},
    {"id": "again", "action": "lookup_user", "with": {"upn": "a@b.example"}},
]
DAYS_40 = timedelta(days=40)
DAYS_10 = timedelta(days=10)


def record(settings: Settings, status: RunStatus, age: timedelta) -> str:
    """A run of two steps, in `status`, created (and ended, if it has) `age` ago."""
    run_id = create_run(settings, "joiners", STEPS, {"id": f"e-{status}-{age}", "source": "t"})
    moment = utcnow() - age
    with session_scope(settings.resolved_database_url) as session:
        run = session.exec(select(FlowRun).where(FlowRun.id == run_id)).one()
        run.status = status
        run.created_at = run.enqueued_at = moment
        if status in (RunStatus.SUCCEEDED, RunStatus.FAILED):
            run.finished_at = moment
    return run_id


def accept(settings: Settings, event_id: str, age: timedelta) -> None:
    with session_scope(settings.resolved_database_url) as session:
        session.add(
            AcceptedEvent(
                source="t", event_id=event_id, event_type="hired", accepted_at=utcnow() - age
            )
        )


def run_ids(settings: Settings) -> set[str]:
    with session_scope(settings.resolved_database_url) as session:
        return set(session.exec(select(FlowRun.id)).all())


def step_run_ids(settings: Settings) -> set[str]:
    with session_scope(settings.resolved_database_url) as session:
        return set(session.exec(select(StepRun.run_id)).all())


def accepted_ids(settings: Settings) -> set[str]:
    with session_scope(settings.resolved_database_url) as session:
        return set(session.exec(select(AcceptedEvent.event_id)).all())


def prune(*args: str) -> dict[str, object]:
    result = CliRunner().invoke(cli, ["runs", "prune", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)  # type: ignore[no-any-return]


def test_prune_deletes_ended_runs_with_their_steps_and_never_one_in_progress(
    settings: Settings,
) -> None:
    succeeded = record(settings, RunStatus.SUCCEEDED, DAYS_40)
    failed = record(settings, RunStatus.FAILED, DAYS_40)
    queued = record(settings, RunStatus.QUEUED, DAYS_40)
    running = record(settings, RunStatus.RUNNING, DAYS_40)
    recent = record(settings, RunStatus.SUCCEEDED, DAYS_10)

    report = prune("--older-than", "30d")

    assert report["runs"] == 2
    assert report["steps"] == 4
    assert run_ids(settings) == {queued, running, recent}
    assert step_run_ids(settings) == {queued, running, recent}
    assert not {succeeded, failed} & step_run_ids(settings)


def test_a_run_that_ended_after_the_cutoff_is_kept_though_created_before(
    settings: Settings,
) -> None:
    run_id = record(settings, RunStatus.SUCCEEDED, DAYS_40)
    with session_scope(settings.resolved_database_url) as session:
        run = session.exec(select(FlowRun).where(FlowRun.id == run_id)).one()
        run.finished_at = utcnow() - DAYS_10

    assert prune("--older-than", "30d")["runs"] == 0
    assert run_ids(settings) == {run_id}


def test_a_dry_run_counts_and_changes_nothing(settings: Settings) -> None:
    kept = {
        record(settings, RunStatus.SUCCEEDED, DAYS_40),
        record(settings, RunStatus.QUEUED, DAYS_40),
    }
    accept(settings, "old", timedelta(days=400))

    report = prune("--older-than", "30d", "--dry-run")

    assert (report["dry_run"], report["runs"], report["steps"]) == (True, 1, 2)
    assert report["accepted_events"] == 1
    assert run_ids(settings) == kept
    assert step_run_ids(settings) == kept
    assert accepted_ids(settings) == {"old"}


def test_accepted_events_are_kept_for_the_minimum_whatever_the_prune_asks(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENTRAFLOW_ACCEPTED_EVENTS_MIN_KEEP_DAYS", "30")
    get_settings.cache_clear()
    accept(settings, "ancient", DAYS_40)
    accept(settings, "recent", DAYS_10)

    # Runs a day old may go; the events that would recognise their redelivery stay.
    report = prune("--older-than", "1d")

    assert report["accepted_events"] == 1
    assert accepted_ids(settings) == {"recent"}


def test_prune_without_a_duration_is_refused(settings: Settings) -> None:
    result = CliRunner().invoke(cli, ["runs", "prune", "--older-than", "soon"])
    assert result.exit_code != 0
    assert "duration" in result.output


def test_housekeeping_prunes_by_the_retention_setting(
    settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENTRAFLOW_RUNS_RETENTION_DAYS", "30")
    get_settings.cache_clear()
    old = record(settings, RunStatus.FAILED, DAYS_40)
    running = record(settings, RunStatus.RUNNING, DAYS_40)
    recent = record(settings, RunStatus.SUCCEEDED, DAYS_10)

    Scheduler(get_settings(), redis_client, "scheduler-1").housekeeping()

    assert run_ids(settings) == {running, recent}
    assert old not in step_run_ids(settings)


def test_housekeeping_keeps_every_run_without_a_retention_setting(
    settings: Settings, redis_client: redis.Redis
) -> None:
    old = record(settings, RunStatus.SUCCEEDED, timedelta(days=4000))

    Scheduler(settings, redis_client, "scheduler-1").housekeeping()

    assert run_ids(settings) == {old}
    with session_scope(settings.resolved_database_url) as session:
        steps = session.exec(select(func.count()).where(col(StepRun.run_id) == old)).one()
    assert steps == len(STEPS)
