"""The audit log: what membership steps record, in their own transaction, and `entraflow audit`."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from sqlalchemy import update
from sqlmodel import select

from cli.main import cli
from entraflow.settings import Settings
from harness.stack import LocalStack
from models.audit import (
    Actor,
    AuditEntry,
    BatchRow,
    FlowStep,
    list_audit_entries,
    membership_change,
    record_membership_changes,
)
from models.connections import Connection, ConnectionKind, save_connection
from models.db import session_scope, utcnow
from models.history import wait_for_run
from models.runs import StepRun
from sandbox.directory import DEMO_GROUPS, DEMO_USERS
from scheduler.runs import create_run, start_run
from worker.actions import ActionResult
from worker.errors import InvalidInputError, NotFoundError, ThrottledError
from worker.steps import DuplicateDelivery, RetryLater, StepFailed, execute_step

USER = "6f5e4d3c-2b1a-4e9d-a4f7-2c7f3e5b0b11"
GROUP = "0b5e3f43-7c2f-4f4a-9d6e-2a1b3c4d5e6f"
EVENT = {"specversion": "1.0", "id": "evt-9", "source": "hr/tests", "type": "t", "data": {}}
APP_ID = "11111111-2222-4333-8444-555555555555"
TENANT_ID = "99999999-8888-4777-8666-555555555555"
SERVICE_ACCOUNT = "svc-entraflow@contoso.com"
RUN_TIMEOUT_S = 60.0


def membership_steps(action: str = "add_user_to_group", condition: str | None = None) -> list:
    step: dict[str, Any] = {
        "id": "change",
        "action": action,
        "with": {"user_id": USER, "group_id": GROUP},
    }
    if condition is not None:
        step["if"] = condition
    return [{"id": "user", "action": "lookup_user", "with": {"user_id": USER}}, step]


@pytest.fixture
def unit_settings(database_url: str, tmp_path: Any) -> Settings:
    return Settings(
        home=tmp_path,
        database_url=database_url,
        redis_url="redis://unused",
        client_id=APP_ID,
        tenant_id=TENANT_ID,
    )


def answering(change: ActionResult | Exception) -> Callable[[str, dict[str, Any]], ActionResult]:
    def perform(action: str, inputs: dict[str, Any]) -> ActionResult:
        if action == "lookup_user":
            return ActionResult({"id": USER, "jobTitle": "Engineer"}, "req-lookup")
        if isinstance(change, Exception):
            raise change
        return change

    return perform


def run_both_steps(
    settings: Settings,
    lock: redis.Redis,
    perform: Callable[[str, dict[str, Any]], ActionResult],
    action: str = "add_user_to_group",
    condition: str | None = None,
) -> str:
    run_id = create_run(settings, "f", membership_steps(action, condition), EVENT)
    execute_step(settings, lock, run_id, "user", "lookup_user", perform)
    execute_step(settings, lock, run_id, "change", action, perform)
    return run_id


def entries(settings: Settings, **filters: Any) -> list[dict[str, Any]]:
    return list_audit_entries(settings.resolved_database_url, limit=100, **filters)


def test_an_added_member_is_audited_with_its_run_event_request_and_app(
    unit_settings: Settings, redis_client: redis.Redis
) -> None:
    added = ActionResult({"success": True, "outcome": "added"}, "req-add")
    run_id = run_both_steps(unit_settings, redis_client, answering(added))

    [entry] = entries(unit_settings)

    assert entry["action"] == "add_user_to_group"
    assert (entry["user_id"], entry["group_id"]) == (USER, GROUP)
    assert entry["outcome"] == "added" and entry["changed"] is True
    assert entry["connection"] == {
        "kind": "app",
        "app_id": APP_ID,
        "tenant_id": TENANT_ID,
        "account": None,
    }
    assert (entry["cause"], entry["run_id"], entry["step_id"]) == ("flow_run", run_id, "change")
    assert (entry["event_source"], entry["event_id"]) == ("hr/tests", "evt-9")
    assert entry["graph_request_id"] == "req-add"
    assert entry["error_code"] is None and entry["error_message"] is None
    assert utcnow() - entry["time"] < timedelta(minutes=1)


@pytest.mark.parametrize(
    ("action", "outcome"),
    [("add_user_to_group", "already_member"), ("remove_member_from_group", "not_member")],
)
def test_an_idempotent_outcome_is_audited_as_no_change(
    unit_settings: Settings, redis_client: redis.Redis, action: str, outcome: str
) -> None:
    result = ActionResult({"success": True, "outcome": outcome}, "req-1")
    run_both_steps(unit_settings, redis_client, answering(result), action)

    [entry] = entries(unit_settings)

    assert (entry["action"], entry["outcome"], entry["changed"]) == (action, outcome, False)


def test_a_delegated_connection_is_audited_as_its_account(
    unit_settings: Settings, redis_client: redis.Redis
) -> None:
    save_connection(
        unit_settings.resolved_database_url,
        Connection(
            kind=ConnectionKind.DELEGATED,
            tenant_id=TENANT_ID,
            client_id=APP_ID,
            account_upn=SERVICE_ACCOUNT,
        ),
    )
    removed = ActionResult({"success": True, "outcome": "removed"}, "req-rm")
    run_both_steps(unit_settings, redis_client, answering(removed), "remove_member_from_group")

    [entry] = entries(unit_settings)

    assert entry["connection"]["kind"] == "delegated"
    assert entry["connection"]["account"] == SERVICE_ACCOUNT
    assert entry["outcome"] == "removed" and entry["changed"] is True


def test_a_change_graph_refuses_is_audited_with_its_error(
    unit_settings: Settings, redis_client: redis.Redis
) -> None:
    refused = NotFoundError(
        "group does not exist", status=404, code="Request_ResourceNotFound", request_id="r-404"
    )
    with pytest.raises(StepFailed):
        run_both_steps(unit_settings, redis_client, answering(refused))

    [entry] = entries(unit_settings)

    assert entry["outcome"] == "not_found" and entry["changed"] is False
    assert entry["error_code"] == "Request_ResourceNotFound"
    assert entry["error_message"] == "group does not exist"
    assert entry["graph_request_id"] == "r-404"


def test_an_input_refused_before_any_request_is_audited(
    unit_settings: Settings, redis_client: redis.Redis
) -> None:
    with pytest.raises(StepFailed):
        run_both_steps(unit_settings, redis_client, answering(InvalidInputError("bad user_id")))

    [entry] = entries(unit_settings)

    assert entry["outcome"] == "invalid_input"
    assert entry["error_message"] == "invalid input: bad user_id"
    assert entry["graph_request_id"] is None


def test_a_retried_step_is_audited_only_when_it_ends(
    unit_settings: Settings, redis_client: redis.Redis
) -> None:
    throttled = ThrottledError("slow down", status=429, retry_after_s=5.0)
    run_id = create_run(unit_settings, "f", membership_steps(), EVENT)
    execute_step(unit_settings, redis_client, run_id, "user", "lookup_user", answering(throttled))
    with pytest.raises(RetryLater):
        execute_step(
            unit_settings, redis_client, run_id, "change", "add_user_to_group", answering(throttled)
        )
    assert entries(unit_settings) == []

    added = ActionResult({"success": True, "outcome": "added"}, "req-add")
    execute_step(
        unit_settings, redis_client, run_id, "change", "add_user_to_group", answering(added)
    )

    assert [entry["outcome"] for entry in entries(unit_settings)] == ["added"]


def test_skipped_steps_and_lookups_record_nothing(
    unit_settings: Settings, redis_client: redis.Redis
) -> None:
    added = ActionResult({"success": True, "outcome": "added"}, "req-add")
    run_both_steps(unit_settings, redis_client, answering(added), condition="{{ false }}")

    assert entries(unit_settings) == []


def test_a_delivery_that_lost_its_claim_audits_nothing(
    unit_settings: Settings, redis_client: redis.Redis
) -> None:
    run_id = create_run(unit_settings, "f", membership_steps(), EVENT)
    execute_step(unit_settings, redis_client, run_id, "user", "lookup_user", answering(Exception()))

    def overtaken(action: str, inputs: dict[str, Any]) -> ActionResult:
        # A redelivery claims the step while this delivery is still at Graph.
        with session_scope(unit_settings.resolved_database_url) as session:
            session.execute(
                update(StepRun)
                .where(StepRun.run_id == run_id)  # type: ignore[arg-type]
                .where(StepRun.step_id == "change")  # type: ignore[arg-type]
                .values(attempts=StepRun.attempts + 1)
            )
        return ActionResult({"success": True, "outcome": "added"}, "req-add")

    with pytest.raises(DuplicateDelivery):
        execute_step(unit_settings, redis_client, run_id, "change", "add_user_to_group", overtaken)

    with session_scope(unit_settings.resolved_database_url) as session:
        assert session.exec(select(AuditEntry)).all() == []


def test_a_batch_row_is_recorded_in_the_callers_transaction(database_url: str) -> None:
    actor = Actor("app", APP_ID, TENANT_ID)
    with session_scope(database_url) as session:
        record_membership_changes(
            session,
            [
                membership_change(
                    action="remove_member_from_group",
                    user_id=USER,
                    group_id=GROUP,
                    outcome="forbidden",
                    actor=actor,
                    cause=BatchRow("batch-1", 7),
                    request_id="r-403",
                    error_code="Authorization_RequestDenied",
                    error_message="Insufficient privileges",
                )
            ],
        )
    with pytest.raises(RuntimeError), session_scope(database_url) as session:
        record_membership_changes(
            session,
            [
                membership_change(
                    action="add_user_to_group",
                    user_id=USER,
                    group_id=GROUP,
                    outcome="added",
                    actor=actor,
                    cause=BatchRow("batch-1", 8),
                )
            ],
        )
        raise RuntimeError("the batch's own write failed: its audit entry goes with it")

    [entry] = list_audit_entries(database_url, limit=10, batch_id="batch-1")

    assert (entry["cause"], entry["batch_id"], entry["batch_row"]) == ("batch", "batch-1", 7)
    assert entry["run_id"] is None and entry["step_id"] is None
    assert entry["error_code"] == "Authorization_RequestDenied"


def test_only_membership_actions_can_be_audited(database_url: str) -> None:
    with pytest.raises(ValueError, match="lookup_user"), session_scope(database_url) as session:
        record_membership_changes(
            session,
            [
                membership_change(
                    action="lookup_user",
                    user_id=USER,
                    group_id=None,
                    outcome="added",
                    actor=Actor("app", APP_ID, TENANT_ID),
                    cause=FlowStep("r", "s"),
                )
            ],
        )


def seed(database_url: str) -> None:
    """Four entries: two runs, one batch, two users, two groups, one of them old."""
    actor = Actor("app", APP_ID, TENANT_ID)
    other_group = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"
    rows: list[tuple[str, str, FlowStep | BatchRow, timedelta]] = [
        (USER, GROUP, FlowStep("run-1", "add"), timedelta(days=3)),
        (USER, other_group, FlowStep("run-2", "add"), timedelta(hours=1)),
        ("adele@contoso.com", GROUP, BatchRow("batch-1", 1), timedelta(minutes=30)),
        (USER, GROUP, BatchRow("batch-1", 2), timedelta(minutes=10)),
    ]
    with session_scope(database_url) as session:
        for user_id, group_id, cause, age in rows:
            record_membership_changes(
                session,
                [
                    membership_change(
                        action="add_user_to_group",
                        user_id=user_id,
                        group_id=group_id,
                        outcome="added",
                        actor=actor,
                        cause=cause,
                        at=utcnow() - age,
                    )
                ],
            )


def audit_json(*args: str) -> list[dict[str, Any]]:
    result = CliRunner().invoke(cli, ["audit", "--json", *args])
    assert result.exit_code == 0, result.output
    listed: list[dict[str, Any]] = json.loads(result.output)
    return listed


def causes(listed: list[dict[str, Any]]) -> list[str]:
    return [entry["run_id"] or f"{entry['batch_id']}#{entry['batch_row']}" for entry in listed]


def test_audit_lists_newest_first_and_filters(settings: Settings) -> None:
    seed(settings.resolved_database_url)

    assert causes(audit_json()) == ["batch-1#2", "batch-1#1", "run-2", "run-1"]
    assert causes(audit_json("--user", USER)) == ["batch-1#2", "run-2", "run-1"]
    assert causes(audit_json("--group", GROUP)) == ["batch-1#2", "batch-1#1", "run-1"]
    assert causes(audit_json("--since", "2h")) == ["batch-1#2", "batch-1#1", "run-2"]
    assert causes(audit_json("--run", "run-1")) == ["run-1"]
    assert causes(audit_json("--batch", "batch-1", "--limit", "1")) == ["batch-1#2"]
    assert causes(audit_json("--user", USER, "--group", GROUP, "--since", "1d")) == ["batch-1#2"]


def test_audit_prints_a_table_and_refuses_a_bad_since(settings: Settings) -> None:
    seed(settings.resolved_database_url)

    table = CliRunner().invoke(cli, ["audit", "--run", "run-2"])
    bad = CliRunner().invoke(cli, ["audit", "--since", "yesterday"])

    assert table.exit_code == 0, table.output
    assert "run-2" in table.output and "added" in table.output
    assert bad.exit_code != 0 and "duration" in bad.output


@pytest.mark.integration
def test_a_flow_through_a_real_worker_audits_its_add_and_remove(stack: LocalStack) -> None:
    user, group = DEMO_USERS["nestor"], DEMO_GROUPS["sales"]
    ids = {"user_id": user.id, "group_id": group.id}
    steps = [
        {"id": "add", "action": "add_user_to_group", "with": ids},
        {"id": "remove", "action": "remove_member_from_group", "with": ids},
    ]
    run_id = start_run(stack.settings, "audit-flow", steps, EVENT)
    run = wait_for_run(stack.settings.resolved_database_url, run_id, timeout_s=RUN_TIMEOUT_S)
    assert run["status"] == "succeeded", run

    listed = audit_json("--run", run_id)

    assert [(e["step_id"], e["outcome"], e["changed"]) for e in listed] == [
        ("remove", "removed", True),
        ("add", "added", True),
    ]
    assert [e["graph_request_id"] for e in listed] == [s["graph_request_id"] for s in run["steps"]][
        ::-1
    ]
    assert all(e["connection"]["app_id"] == stack.settings.client_id for e in listed)
