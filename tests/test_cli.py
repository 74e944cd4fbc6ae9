"""The `entraflow` command as a user runs it: real processes, the sandbox over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import requests
from click.testing import CliRunner

from cli.main import SUBCOMMANDS, cli
from harness.ports import free_port
from harness.stack import sandbox_environment
from harness.waiting import wait_until
from sandbox.directory import (
    DEMO_GROUPS,
    DEMO_USERS,
)
from sandbox.server import SandboxServer

DEMO_USER_UPN = DEMO_USERS["nestor"].upn
DEMO_GROUP_ID = DEMO_GROUPS["sales"].id

pytestmark = pytest.mark.integration

COMMAND_TIMEOUT_S = 60


def entraflow(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


@pytest.fixture
def sandbox_env(sandbox_server: SandboxServer, tmp_path: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("ENTRAFLOW_")},
        "ENTRAFLOW_HOME": str(tmp_path),
        **sandbox_environment(sandbox_server),
    }


def ok(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_four_actions_print_graph_outputs_as_json(sandbox_env: dict[str, str]) -> None:
    user = ok(entraflow("action", "lookup-user", "--upn", DEMO_USER_UPN, env=sandbox_env))
    assert user["userPrincipalName"] == DEMO_USER_UPN
    group = ok(entraflow("action", "lookup-group", "--group-id", DEMO_GROUP_ID, env=sandbox_env))
    assert group["id"] == DEMO_GROUP_ID
    assert {"displayName", "description", "mail", "mailEnabled", "securityEnabled"} <= set(group)
    membership = ["--user-id", user["id"], "--group-id", DEMO_GROUP_ID]
    assert ok(entraflow("action", "add-user-to-group", *membership, env=sandbox_env)) == {
        "success": True,
        "outcome": "added",
    }
    assert ok(entraflow("action", "add-user-to-group", *membership, env=sandbox_env)) == {
        "success": True,
        "outcome": "already_member",
    }
    assert ok(entraflow("action", "remove-member-from-group", *membership, env=sandbox_env)) == {
        "success": True,
        "outcome": "removed",
    }
    assert ok(entraflow("action", "remove-member-from-group", *membership, env=sandbox_env)) == {
        "success": True,
        "outcome": "not_member",
    }


def test_a_missing_user_exits_non_zero_with_a_json_error(sandbox_env: dict[str, str]) -> None:
    result = entraflow(
        "action",
        "lookup-user",
        "--user-id",
        "11111111-2222-4333-8444-555555555555",
        env=sandbox_env,
    )
    assert result.returncode != 0
    body = json.loads(result.stdout)
    assert body["success"] is False
    assert body["error"]["outcome"] == "not_found"
    assert body["error"]["code"] == "Request_ResourceNotFound"
    assert body["error"]["request_id"]
    assert "Traceback" not in result.stderr


def test_an_invalid_id_is_refused_before_any_request(
    sandbox_env: dict[str, str], sandbox_server: SandboxServer
) -> None:
    before = sandbox_server.app.stats()["requests_total"]
    result = entraflow("action", "lookup-group", "--group-id", "../users", env=sandbox_env)
    assert result.returncode != 0
    assert json.loads(result.stdout)["error"]["outcome"] == "invalid_input"
    assert sandbox_server.app.stats()["requests_total"] == before


def test_a_wrong_client_secret_gives_one_clear_line_and_never_the_secret(
    sandbox_env: dict[str, str],
) -> None:
    wrong = "not-the-secret-0123456789abcdef"
    env = {**sandbox_env, "ENTRAFLOW_CLIENT_SECRET": wrong}
    result = entraflow("action", "lookup-group", "--group-id", DEMO_GROUP_ID, env=env)
    assert result.returncode != 0
    assert "invalid_client" in result.stdout
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert wrong not in result.stdout + result.stderr


def test_the_demo_runs_example_events_through_scheduler_and_worker_and_exits_zero(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENTRAFLOW_")}
    env["ENTRAFLOW_HOME"] = str(tmp_path / "home")
    result = subprocess.run(
        [sys.executable, "-m", "cli", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The embedded Redis's password stays in its private file, never on the screen.
    password = (tmp_path / "home" / "redis" / "password").read_text().strip()
    assert password not in result.stdout + result.stderr
    round_trip = result.stdout.split("demo.membership.checked")[1]
    for step_id, action in (
        ("user", "lookup_user"),
        ("group", "lookup_group"),
        ("add", "add_user_to_group"),
        ("remove", "remove_member_from_group"),
    ):
        assert f"[succeeded] {step_id}: {action}" in round_trip
    assert "went to entraflow:events:dead" in result.stdout
    assert "All runs ended" in result.stdout
    # It stopped the Redis it started.
    assert not (tmp_path / "home" / "redis" / "port").exists()


def test_every_subcommand_is_found_under_its_own_name_and_unknown_ones_are_refused() -> None:
    with click.Context(cli) as context:
        for name in SUBCOMMANDS:
            command = cli.get_command(context, name)
            assert command is not None and command.name == name
        assert cli.get_command(context, "no-such-command") is None
    result = CliRunner().invoke(cli, ["no-such-command"])
    assert result.exit_code == 2 and "No such command 'no-such-command'" in result.output


def test_the_sandbox_command_serves_the_latency_it_is_given(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "sandbox", f"--port={port}", "--latency-ms=200",
         "--latency-p99-ms=500"],
        env={**os.environ, "ENTRAFLOW_HOME": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def config() -> dict[str, Any] | None:
            assert process.poll() is None, "the sandbox exited"
            try:
                answer = requests.get(f"http://127.0.0.1:{port}/_sandbox/config", timeout=1)
            except requests.ConnectionError:
                return None
            return dict(answer.json())

        served = wait_until(config, "the sandbox to answer", timeout_s=COMMAND_TIMEOUT_S)
        assert (served["latency_s"], served["latency_p99_s"]) == (0.2, 0.5)
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_sandbox_command_refuses_a_99th_percentile_below_the_median() -> None:
    result = CliRunner().invoke(cli, ["sandbox", "--latency-ms=200", "--latency-p99-ms=100"])

    assert result.exit_code == 2
    assert "latency_p99_s cannot be below latency_s" in result.output
