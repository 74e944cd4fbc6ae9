"""The step logic behind every task, called as plain functions (no Celery, no Graph)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import redis
from sqlmodel import select

from entraflow import keys
from entraflow.settings import Settings
from models.db import session_scope
from models.history import show_run
from models.runs import StepRun, StepStatus, utcnow
from scheduler.runs import create_run
from worker.actions import ActionResult
from worker.budget import BudgetExhaustedError
from worker.errors import NotFoundError, ThrottledError
from worker.steps import (
    DuplicateDelivery,
    RetryLater,
    StepFailed,
    execute_step,
    fail_step,
    redact,
)

EVENT = {"specversion": "1.0", "id": "e1", "source": "tests", "type": "t", "data": {"upn": "a@b.c"}}
STEPS = [
    {"id": "user", "action": "lookup_user", "with": {"upn": "{{ event.data.upn }}"}},
    {
        "id": "add",
        "action": "add_user_to_group",
        "with": {"user_id": "{{ steps.user.id }}", "group_id": "g"},
        "if": "{{ steps.user.jobTitle != 'Contractor' }}",
    },
]


@pytest.fixture
def lock_redis(fake_redis: redis.Redis) -> redis.Redis:
    # Step locks are redis-py Lua scripts: fakeredis runs them (lupa) without a server.
    return fake_redis


@pytest.fixture
def unit_settings(database_url: str, tmp_path: Any) -> Settings:
    return Settings(home=tmp_path, database_url=database_url, redis_url="redis://unused")


def performer(outputs: dict[str, Any]) -> Callable[[str, dict[str, Any]], ActionResult]:
    calls: list[tuple[str, dict[str, Any]]] = []

    def perform(action: str, inputs: dict[str, Any]) -> ActionResult:
        calls.append((action, inputs))
        outcome = outputs[action]
        if isinstance(outcome, Exception):
            raise outcome
        return ActionResult(output=outcome, request_id=f"req-{action}")

    perform.calls = calls  # type: ignore[attr-defined]
    return perform


def step_row(settings: Settings, run_id: str, step_id: str) -> StepRun:
    with session_scope(settings.resolved_database_url) as session:
        return session.exec(
            select(StepRun).where(StepRun.run_id == run_id).where(StepRun.step_id == step_id)
        ).one()


def test_a_step_renders_its_inputs_from_earlier_outputs_and_records_everything(
    unit_settings: Settings, lock_redis: redis.Redis
) -> None:
    run_id = create_run(unit_settings, "f", STEPS, EVENT)
    perform = performer(
        {
            "lookup_user": {"id": "u1", "jobTitle": "Engineer"},
            "add_user_to_group": {"success": True, "outcome": "added"},
        }
    )
    assert (
        execute_step(unit_settings, lock_redis, run_id, "user", "lookup_user", perform)
        == "succeeded"
    )
    assert (
        execute_step(unit_settings, lock_redis, run_id, "add", "add_user_to_group", perform)
        == "succeeded"
    )
    assert perform.calls == [  # type: ignore[attr-defined]
        ("lookup_user", {"upn": "a@b.c"}),
        ("add_user_to_group", {"user_id": "u1", "group_id": "g"}),
    ]
    run = show_run(unit_settings.resolved_database_url, run_id)
    assert run is not None
    assert run["status"] == "succeeded"
    add = run["steps"][1]
    assert add["inputs"] == {"user_id": "u1", "group_id": "g"}
    assert add["output"] == {"success": True, "outcome": "added"}
    assert add["graph_request_id"] == "req-add_user_to_group"
    assert add["attempts"] == 1
    assert lock_redis.keys(keys.step_lock(run_id, "*")) == []


def test_a_false_condition_skips_the_step_without_calling_graph(
    unit_settings: Settings, lock_redis: redis.Redis
) -> None:
    run_id = create_run(unit_settings, "f", STEPS, EVENT)
    perform = performer({"lookup_user": {"id": "u1", "jobTitle": "Contractor"}})
    execute_step(unit_settings, lock_redis, run_id, "user", "lookup_user", perform)
    assert (
        execute_step(unit_settings, lock_redis, run_id, "add", "add_user_to_group", perform)
        == "skipped"
    )
    assert len(perform.calls) == 1  # type: ignore[attr-defined]
    run = show_run(unit_settings.resolved_database_url, run_id)
    assert run is not None and run["status"] == "succeeded"


def test_a_permanent_graph_error_fails_the_step_and_the_run(
    unit_settings: Settings, lock_redis: redis.Redis
) -> None:
    run_id = create_run(unit_settings, "f", STEPS, EVENT)
    missing = NotFoundError(
        "Resource 'x' does not exist",
        status=404,
        code="Request_ResourceNotFound",
        request_id="r-404",
    )
    with pytest.raises(StepFailed):
        execute_step(
            unit_settings,
            lock_redis,
            run_id,
            "user",
            "lookup_user",
            performer({"lookup_user": missing}),
        )
    run = show_run(unit_settings.resolved_database_url, run_id)
    assert run is not None
    assert run["status"] == "failed"
    assert "Resource 'x' does not exist" in run["error"]
    user = run["steps"][0]
    assert user["status"] == "failed"
    assert user["error"]["outcome"] == "not_found"
    assert user["error"]["code"] == "Request_ResourceNotFound"
    assert user["graph_request_id"] == "r-404"
    assert run["steps"][1]["status"] == "queued"


def test_a_long_throttle_goes_back_to_the_queue_with_graphs_wait(
    unit_settings: Settings, lock_redis: redis.Redis
) -> None:
    run_id = create_run(unit_settings, "f", STEPS, EVENT)
    throttled = ThrottledError(
        "Too many requests", status=429, code="TooManyRequests", retry_after_s=42.0
    )
    with pytest.raises(RetryLater) as raised:
        execute_step(
            unit_settings,
            lock_redis,
            run_id,
            "user",
            "lookup_user",
            performer({"lookup_user": throttled}),
        )
    assert raised.value.countdown_s == 42.0
    assert step_row(unit_settings, run_id, "user").status == StepStatus.RETRYING
    perform = performer({"lookup_user": {"id": "u1"}})
    assert (
        execute_step(unit_settings, lock_redis, run_id, "user", "lookup_user", perform)
        == "succeeded"
    )
    row = step_row(unit_settings, run_id, "user")
    assert row.attempts == 2
    assert row.error is None


def test_a_throttle_past_the_time_budget_fails_with_the_last_graph_error(
    unit_settings: Settings, lock_redis: redis.Redis
) -> None:
    run_id = create_run(unit_settings, "f", STEPS, EVENT)
    with session_scope(unit_settings.resolved_database_url) as session:
        row = session.exec(select(StepRun).where(StepRun.step_id == "user")).one()
        row.started_at = utcnow() - timedelta(seconds=unit_settings.max_graph_retry_time_s)
    throttled = ThrottledError(
        "Too many requests", status=429, code="TooManyRequests", retry_after_s=10.0
    )
    with pytest.raises(StepFailed) as raised:
        execute_step(
            unit_settings,
            lock_redis,
            run_id,
            "user",
            "lookup_user",
            performer({"lookup_user": throttled}),
        )
    assert raised.value.error["code"] == "TooManyRequests"
    assert "gave up after" in raised.value.error["message"]


def test_a_template_naming_a_missing_value_fails_the_step_clearly(
    unit_settings: Settings, lock_redis: redis.Redis
) -> None:
    event = {**EVENT, "data": {}}
    run_id = create_run(unit_settings, "f", STEPS, event)
    with pytest.raises(StepFailed) as raised:
        execute_step(unit_settings, lock_redis, run_id, "user", "lookup_user", performer({}))
    assert raised.value.error["outcome"] == "invalid_input"
    assert "upn" in raised.value.error["message"]


def test_a_redelivered_succeeded_step_forwards_the_chain_only_while_the_next_step_waits(
    unit_settings: Settings, lock_redis: redis.Redis
) -> None:
    run_id = create_run(unit_settings, "f", STEPS, EVENT)
    perform = performer(
        {
            "lookup_user": {"id": "u1", "jobTitle": "Engineer"},
            "add_user_to_group": {"success": True, "outcome": "added"},
        }
    )
    execute_step(unit_settings, lock_redis, run_id, "user", "lookup_user", perform)
    # A crash after recording the step but before queuing the next: the redelivery forwards.
    assert (
        execute_step(unit_settings, lock_redis, run_id, "user", "lookup_user", perform)
        == "succeeded"
    )
    execute_step(unit_settings, lock_redis, run_id, "add", "add_user_to_group", perform)
    with pytest.raises(DuplicateDelivery):
        execute_step(unit_settings, lock_redis, run_id, "user", "lookup_user", perform)
    with pytest.raises(DuplicateDelivery):
        execute_step(unit_settings, lock_redis, run_id, "add", "add_user_to_group", perform)
    assert len(perform.calls) == 2  # type: ignore[attr-defined]


def test_a_step_locked_by_another_delivery_is_retried_later_not_run_twice(
    unit_settings: Settings, lock_redis: redis.Redis
) -> None:
    run_id = create_run(unit_settings, "f", STEPS, EVENT)
    lock_redis.set(keys.step_lock(run_id, "user"), "other", px=30_000)
    perform = performer({"lookup_user": {"id": "u1"}})
    with pytest.raises(RetryLater) as raised:
        execute_step(unit_settings, lock_redis, run_id, "user", "lookup_user", perform)
    assert 1.0 <= raised.value.countdown_s <= 10.0
    assert perform.calls == []  # type: ignore[attr-defined]


def test_a_step_delivered_too_often_fails_instead_of_looping(
    unit_settings: Settings, lock_redis: redis.Redis
) -> None:
    run_id = create_run(unit_settings, "f", STEPS, EVENT)
    with session_scope(unit_settings.resolved_database_url) as session:
        row = session.exec(select(StepRun).where(StepRun.step_id == "user")).one()
        row.attempts = unit_settings.max_step_deliveries
        row.status = StepStatus.RUNNING
    with pytest.raises(StepFailed) as raised:
        execute_step(unit_settings, lock_redis, run_id, "user", "lookup_user", performer({}))
    assert "delivered" in raised.value.error["message"]
    run = show_run(unit_settings.resolved_database_url, run_id)
    assert run is not None and run["status"] == "failed"


def test_a_delivery_that_lost_its_claim_records_nothing(
    unit_settings: Settings, lock_redis: redis.Redis
) -> None:
    run_id = create_run(unit_settings, "f", STEPS, EVENT)

    def slow_perform(action: str, inputs: dict[str, Any]) -> ActionResult:
        # Meanwhile another delivery took the step over (this one outlived its lease).
        with session_scope(unit_settings.resolved_database_url) as session:
            row = session.exec(select(StepRun).where(StepRun.step_id == "user")).one()
            row.attempts += 1
        return ActionResult(output={"id": "late"}, request_id=None)

    with pytest.raises(DuplicateDelivery):
        execute_step(unit_settings, lock_redis, run_id, "user", "lookup_user", slow_perform)
    assert step_row(unit_settings, run_id, "user").output is None


def test_a_crashed_task_marks_its_step_and_run_failed(unit_settings: Settings) -> None:
    run_id = create_run(unit_settings, "f", STEPS, EVENT)
    fail_step(unit_settings, run_id, "user", "internal error: boom")
    run = show_run(unit_settings.resolved_database_url, run_id)
    assert run is not None
    assert run["status"] == "failed"
    assert run["steps"][0]["error"]["message"] == "internal error: boom"


def test_secret_looking_inputs_are_redacted_for_the_history() -> None:
    assert redact({"user_id": "u", "client_secret": "s", "accessToken": "t"}) == {
        "user_id": "u",
        "client_secret": "[redacted]",
        "accessToken": "[redacted]",
    }


def test_a_template_raising_a_python_error_fails_the_step_clearly(
    unit_settings: Settings, lock_redis: redis.Redis
) -> None:
    steps = [{"id": "user", "action": "lookup_user", "with": {"upn": "{{ event.data.upn / 0 }}"}}]
    run_id = create_run(unit_settings, "f", steps, EVENT)
    with pytest.raises(StepFailed) as raised:
        execute_step(unit_settings, lock_redis, run_id, "user", "lookup_user", performer({}))
    assert raised.value.error["outcome"] == "invalid_input"
    assert "TypeError" in raised.value.error["message"]


def test_a_delivery_that_spent_its_attempts_goes_back_to_the_queue_within_the_time_budget(
    unit_settings: Settings, lock_redis: redis.Redis
) -> None:
    run_id = create_run(unit_settings, "f", STEPS, EVENT)
    throttled = ThrottledError("Too many requests", status=429, code="TooManyRequests")
    throttled.retries_exhausted = True
    with pytest.raises(RetryLater) as raised:
        execute_step(
            unit_settings,
            lock_redis,
            run_id,
            "user",
            "lookup_user",
            performer({"lookup_user": throttled}),
        )
    assert raised.value.countdown_s == unit_settings.max_inprocess_wait_s
    assert step_row(unit_settings, run_id, "user").status == StepStatus.RETRYING


def test_waiting_for_the_shared_budget_spends_neither_deliveries_nor_the_time_budget(
    unit_settings: Settings, lock_redis: redis.Redis
) -> None:
    # Found by the chaos load scenario: a 50,000-event backlog failed runs that only waited.
    run_id = create_run(unit_settings, "f", STEPS, EVENT)
    waiting = performer({"lookup_user": BudgetExhaustedError("budget spent", retry_after_s=90.0)})

    for _ in range(unit_settings.max_step_deliveries + 1):
        with pytest.raises(RetryLater) as raised:
            execute_step(unit_settings, lock_redis, run_id, "user", "lookup_user", waiting)
        assert raised.value.countdown_s == 90.0
    row = step_row(unit_settings, run_id, "user")
    assert (row.status, row.attempts, row.started_at) == (StepStatus.RETRYING, 0, None)

    done = performer({"lookup_user": {"id": "u1", "jobTitle": "Engineer"}})
    assert execute_step(unit_settings, lock_redis, run_id, "user", "lookup_user", done) == (
        "succeeded"
    )
