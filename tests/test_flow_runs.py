"""Flow runs as Celery chains: a real worker process, a real Redis, the sandbox over HTTP."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from cli.main import cli
from harness.stack import LocalStack
from models.history import wait_for_run
from sandbox.directory import DEMO_GROUPS, DEMO_USERS
from sandbox.stats import RouteKind
from scheduler.runs import start_run

DEMO_USER_UPN = DEMO_USERS["nestor"].upn
DEMO_GROUP_ID = DEMO_GROUPS["sales"].id

pytestmark = pytest.mark.integration

RUN_TIMEOUT_S = 60.0
FOUR_STEPS: list[dict[str, Any]] = [
    {"id": "user", "action": "lookup_user", "with": {"upn": "{{ event.data.upn }}"}},
    {"id": "group", "action": "lookup_group", "with": {"group_id": "{{ event.data.group_id }}"}},
    {
        "id": "add",
        "action": "add_user_to_group",
        "with": {"user_id": "{{ steps.user.id }}", "group_id": "{{ steps.group.id }}"},
    },
    {
        "id": "remove",
        "action": "remove_member_from_group",
        "with": {"user_id": "{{ steps.user.id }}", "group_id": "{{ steps.group.id }}"},
    },
]


def event(**data: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": "evt-1", "source": "tests", "type": "t", "data": data}


def run_to_end(
    stack: LocalStack, steps: list[dict[str, Any]], data: dict[str, Any]
) -> dict[str, Any]:
    run_id = start_run(stack.settings, "test-flow", steps, event(**data))
    return wait_for_run(stack.settings.resolved_database_url, run_id, timeout_s=RUN_TIMEOUT_S)


def test_a_four_action_flow_runs_as_a_chain_through_a_real_worker(stack: LocalStack) -> None:
    run = run_to_end(stack, FOUR_STEPS, {"upn": DEMO_USER_UPN, "group_id": DEMO_GROUP_ID})

    assert run["status"] == "succeeded", run
    user, group, add, remove = run["steps"]
    assert user["output"]["userPrincipalName"] == DEMO_USER_UPN
    assert set(user["output"]) == {
        "id", "displayName", "givenName", "surname", "mail", "userPrincipalName", "jobTitle"
    }  # fmt: skip
    assert group["output"]["id"] == DEMO_GROUP_ID
    assert add["inputs"] == {"user_id": user["output"]["id"], "group_id": DEMO_GROUP_ID}
    assert add["output"] == {"success": True, "outcome": "added"}
    assert remove["output"] == {"success": True, "outcome": "removed"}
    assert all(step["attempts"] == 1 and step["graph_request_id"] for step in run["steps"])
    assert user["output"]["id"] not in stack.sandbox.app.directory.members(DEMO_GROUP_ID)


def test_a_failing_step_fails_the_run_and_stops_the_chain(stack: LocalStack) -> None:
    unknown_group = "00000000-0000-4000-8000-00000000dead"
    run = run_to_end(stack, FOUR_STEPS, {"upn": DEMO_USER_UPN, "group_id": unknown_group})

    assert run["status"] == "failed", run
    statuses = [step["status"] for step in run["steps"]]
    assert statuses == ["succeeded", "failed", "queued", "queued"]
    error = run["steps"][1]["error"]
    assert error["outcome"] == "not_found"
    assert error["code"] == "Request_ResourceNotFound"
    assert error["request_id"]


def test_a_long_throttle_sends_the_step_back_to_the_queue_and_it_finishes(
    stack: LocalStack,
) -> None:
    # Longer than the worker sleeps in process, so the step must go back to the queue.
    stack.sandbox.app.add_fault(
        method="POST", path_regex=r"/members/\$ref$", status=429, retry_after="6", count=1
    )
    run = run_to_end(stack, FOUR_STEPS, {"upn": DEMO_USER_UPN, "group_id": DEMO_GROUP_ID})

    assert run["status"] == "succeeded", run
    add = run["steps"][2]
    assert add["attempts"] == 2
    assert add["output"] == {"success": True, "outcome": "added"}
    assert stack.sandbox.app.stats()["early_retries"] == 0


def test_task_messages_carry_ids_and_never_a_secret(stack: LocalStack, redis_url: str) -> None:
    for worker in stack.worker_processes:  # keep the messages on the queue to read them
        worker.terminate()
        worker.wait()
    run_id = start_run(
        stack.settings, "test-flow", FOUR_STEPS, event(upn=DEMO_USER_UPN, group_id=DEMO_GROUP_ID)
    )
    client = redis.Redis.from_url(redis_url)
    raw = [json.loads(m) for m in client.lrange("entraflow:flows", 0, -1)]
    assert len(raw) == 1
    message = json.dumps(raw[0])
    assert run_id in message
    secret = stack.settings.client_secret
    assert secret is not None and secret.get_secret_value() not in message
    assert raw[0]["headers"]["task"] == "entra.lookup_user"


def test_a_token_expiring_between_runs_is_refreshed_invisibly(stack: LocalStack) -> None:
    data = {"upn": DEMO_USER_UPN, "group_id": DEMO_GROUP_ID}
    assert run_to_end(stack, FOUR_STEPS, data)["status"] == "succeeded"
    assert stack.sandbox.app.expire_tokens() >= 1

    run = run_to_end(stack, FOUR_STEPS, data)

    assert run["status"] == "succeeded", run
    assert all(step["attempts"] == 1 for step in run["steps"])
    assert stack.sandbox.app.stats()["responses"].get("401", 0) >= 1


def test_a_failed_run_replays_from_its_failed_step_keeping_earlier_outputs(
    stack: LocalStack,
) -> None:
    stack.sandbox.app.add_fault(
        method="POST",
        path_regex=r"/members/\$ref$",
        status=403,
        code="Authorization_RequestDenied",
        count=1,
    )
    failed = run_to_end(stack, FOUR_STEPS, {"upn": DEMO_USER_UPN, "group_id": DEMO_GROUP_ID})
    assert [s["status"] for s in failed["steps"]] == ["succeeded", "succeeded", "failed", "queued"]
    assert failed["steps"][2]["error"]["outcome"] == "forbidden"
    requests_before = graph_requests(stack)

    result = CliRunner().invoke(cli, ["runs", "replay", failed["id"], "--json"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [{"id": failed["id"], "from_step": "add"}]
    run = wait_for_run(stack.settings.resolved_database_url, failed["id"], timeout_s=RUN_TIMEOUT_S)
    assert run["status"] == "succeeded", run
    assert run["steps"][0]["output"] == failed["steps"][0]["output"]
    assert [s["attempts"] for s in run["steps"]] == [1, 1, 1, 1]
    # Only the add and the remove went to Graph again.
    assert graph_requests(stack) - requests_before == {
        "POST member_add": 1,
        "DELETE member_remove": 1,
    }


def graph_requests(stack: LocalStack) -> Counter[str]:
    """The Graph requests the sandbox saw, by method and kind; token requests left out.

    Each pool process caches its own access token, so a replayed step that lands in a process
    that has not asked for one yet adds a token request: not a Graph request (it once made this
    count 3 instead of 2).
    """
    requests = stack.sandbox.app.stats()["requests"]
    return Counter(
        {
            f"{method} {kind}": count
            for method, kinds in requests.items()
            for kind, count in kinds.items()
            if kind != RouteKind.TOKEN
        }
    )


def test_only_failed_runs_replay(stack: LocalStack) -> None:
    run = run_to_end(stack, FOUR_STEPS, {"upn": DEMO_USER_UPN, "group_id": DEMO_GROUP_ID})
    result = CliRunner().invoke(cli, ["runs", "replay", run["id"]])
    assert result.exit_code != 0
    assert "only a failed run can be replayed" in result.output
