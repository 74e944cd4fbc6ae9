"""`entraflow flows ...` as a user runs it; `flows test` against the sandbox, never writing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from cli.main import cli
from entraflow.settings import Settings, get_settings
from harness.stack import sandbox_environment
from sandbox.directory import (
    DEMO_GROUPS,
    DEMO_USERS,
)
from sandbox.server import SandboxServer

EXAMPLES = Path(__file__).parent.parent / "entraflow" / "examples"
EXAMPLE_FLOWS = EXAMPLES / "flows"
EXAMPLE_EVENTS = EXAMPLES / "events"
COMMAND_TIMEOUT_S = 60
WRITE_METHODS = ("POST", "PATCH", "DELETE")


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def ok_json(result: Result) -> Any:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def write_event(folder: Path, event_type: str, data: dict[str, Any]) -> Path:
    path = folder / "event.json"
    event = {"specversion": "1.0", "id": "e-1", "source": "tests", "type": event_type, "data": data}
    path.write_text(json.dumps(event), encoding="utf-8")
    return path


@pytest.fixture
def applied(settings: Settings) -> Settings:
    """Settings whose database holds the example flows."""
    assert run("flows", "apply", str(EXAMPLE_FLOWS)).exit_code == 0
    return settings


@pytest.fixture
def graph_sandbox(
    applied: Settings, sandbox_server: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SandboxServer]:
    """The example flows applied, and the settings pointing at the Graph sandbox."""
    for name, value in {
        **sandbox_environment(sandbox_server),
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield sandbox_server
    get_settings.cache_clear()


def writes_seen(server: SandboxServer) -> int:
    stats = server.app.stats()
    requests = stats["requests"]
    sent = sum(sum(requests.get(method, {}).values()) for method in WRITE_METHODS)
    # The token request is a POST to the identity endpoint, not a Graph write.
    token_requests = requests.get("POST", {}).get("token", 0)
    return int(stats["writes_applied"]) + sent - token_requests


def test_apply_reports_created_then_unchanged_and_list_shows_the_flows(settings: Settings) -> None:
    first = run("flows", "apply", str(EXAMPLE_FLOWS))
    assert first.exit_code == 0, first.stderr
    assert first.stdout.splitlines() == [
        "created    add-new-sales-hire  (version 1)",
        "created    grant-project-access  (version 1)",
        "created    membership-round-trip  (version 1)",
        "created    remove-leaver  (version 1)",
    ]
    again = run("flows", "apply", str(EXAMPLE_FLOWS / "remove-leaver.yaml"))
    assert again.stdout.splitlines() == ["unchanged  remove-leaver  (version 1)"]
    listed = ok_json(run("flows", "list", "--json"))
    assert [(f["name"], f["trigger"], f["enabled"], f["steps"]) for f in listed] == [
        ("add-new-sales-hire", "hr.employee.hired", True, 2),
        ("grant-project-access", "it.access.requested", True, 3),
        ("membership-round-trip", "demo.membership.checked", True, 4),
        ("remove-leaver", "hr.employee.left", True, 2),
    ]
    table = run("flows", "list")
    assert table.exit_code == 0
    assert "flow" in table.stdout


def test_apply_prints_every_problem_on_stderr_exits_1_and_stores_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    (tmp_path / "good.yaml").write_text(
        (EXAMPLE_FLOWS / "remove-leaver.yaml").read_text(), encoding="utf-8"
    )
    (tmp_path / "bad.yaml").write_text(
        "name: bad\ntrigger: {type: t}\nsteps:\n"
        "  - {id: a, action: add_user, with: {user_id: '{{ steps.b.id }}'}}\n",
        encoding="utf-8",
    )
    result = run("flows", "apply", str(tmp_path))
    assert result.exit_code == 1
    bad = tmp_path / "bad.yaml"
    assert result.stderr.splitlines() == [
        f"{bad}: step 'a': unknown action 'add_user'; known: add_user_to_group, lookup_group, "
        "lookup_user, remove_member_from_group",
        f"{bad}: step 'a': with.user_id: reads steps.b, but the flow has no step 'b'",
        "entraflow: 2 problem(s) in the flow files; nothing was stored",
    ]
    assert ok_json(run("flows", "list", "--json")) == []


def test_disable_and_enable_switch_a_flow(applied: Settings) -> None:
    assert run("flows", "disable", "remove-leaver").stdout == "disabled  remove-leaver\n"
    flags = {f["name"]: f["enabled"] for f in ok_json(run("flows", "list", "--json"))}
    assert flags == {
        "add-new-sales-hire": True,
        "grant-project-access": True,
        "membership-round-trip": True,
        "remove-leaver": False,
    }
    assert run("flows", "enable", "remove-leaver").exit_code == 0
    assert all(f["enabled"] for f in ok_json(run("flows", "list", "--json")))


def test_enabling_an_unknown_flow_exits_1_with_not_found(applied: Settings) -> None:
    result = run("flows", "enable", "nope")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["outcome"] == "not_found"
    assert "no flow named 'nope'" in result.stderr


@pytest.mark.integration
def test_flows_test_runs_lookups_and_only_plans_the_write(graph_sandbox: SandboxServer) -> None:
    event = EXAMPLE_EVENTS / "employee-hired-sales.json"
    report = ok_json(run("flows", "test", "add-new-sales-hire", "--event", str(event), "--json"))
    nestor, sales = DEMO_USERS["nestor"], DEMO_GROUPS["sales"]
    assert report["matches"] is True
    assert report["trigger"]["if_result"] is True
    user, add = report["steps"]
    assert (user["status"], user["output"]["id"]) == ("succeeded", nestor.id)
    assert add["status"] == "planned"
    assert add["if_result"] is True
    assert add["inputs"] == {"user_id": nestor.id, "group_id": sales.id}
    assert add["plan"] == f"would add user {nestor.id} to group {sales.id}"
    assert report["error"] is None
    assert graph_sandbox.app.stats()["requests"]["GET"]["user"] == 1
    assert writes_seen(graph_sandbox) == 0


@pytest.mark.integration
def test_flows_test_shows_a_skipped_step_and_a_planned_removal(
    graph_sandbox: SandboxServer,
) -> None:
    contractor = EXAMPLE_EVENTS / "employee-hired-sales-contractor.json"
    report = ok_json(
        run("flows", "test", "add-new-sales-hire", "--event", str(contractor), "--json")
    )
    assert [(s["id"], s["status"]) for s in report["steps"]] == [
        ("user", "succeeded"),
        ("add", "skipped"),
    ]
    leaver = EXAMPLE_EVENTS / "employee-left.json"
    text = run("flows", "test", "remove-leaver", "--event", str(leaver))
    assert text.exit_code == 0, text.stderr
    megan, all_staff = DEMO_USERS["megan"].id, DEMO_GROUPS["all-staff"].id
    assert f"would remove user {megan} from group {all_staff} (not sent)" in text.stdout
    assert "Nothing was written to Graph." in text.stdout
    assert writes_seen(graph_sandbox) == 0


@pytest.mark.integration
def test_flows_test_looks_up_by_email_and_reads_earlier_outputs(
    graph_sandbox: SandboxServer,
) -> None:
    event = EXAMPLE_EVENTS / "access-requested.json"
    report = ok_json(run("flows", "test", "grant-project-access", "--event", str(event), "--json"))
    user, group, add = report["steps"]
    assert user["output"]["id"] == DEMO_USERS["kim"].id
    assert group["output"]["securityEnabled"] is True
    assert add["status"] == "planned"
    assert writes_seen(graph_sandbox) == 0


@pytest.mark.parametrize(
    ("event_type", "data"),
    [
        pytest.param("hr.employee.left", {"upn": "x@contoso.example"}, id="other-type"),
        pytest.param(
            "hr.employee.hired", {"upn": "x@contoso.example", "department": "Eng"}, id="if-false"
        ),
    ],
)
def test_flows_test_reports_no_run_when_the_trigger_does_not_match(
    applied: Settings, tmp_path: Path, event_type: str, data: dict[str, Any]
) -> None:
    event = write_event(tmp_path, event_type, data)
    report = ok_json(run("flows", "test", "add-new-sales-hire", "--event", str(event), "--json"))
    assert report["matches"] is False
    assert report["steps"] == []
    text = run("flows", "test", "add-new-sales-hire", "--event", str(event))
    assert "no run:" in text.stdout


def test_flows_test_fails_when_a_template_fails_on_the_event(
    applied: Settings, tmp_path: Path
) -> None:
    event = write_event(tmp_path, "hr.employee.hired", {"department": "Sales"})
    result = run("flows", "test", "add-new-sales-hire", "--event", str(event), "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["error"]["outcome"] == "invalid_input"
    assert report["error"]["step"] == "user"
    assert "'dict object' has no attribute 'upn'" in result.stderr


@pytest.mark.integration
def test_flows_test_fails_when_a_lookup_finds_nothing(
    graph_sandbox: SandboxServer, tmp_path: Path
) -> None:
    data = {"upn": "nobody@contoso.example", "department": "Sales"}
    event = write_event(tmp_path, "hr.employee.hired", data)
    result = run("flows", "test", "add-new-sales-hire", "--event", str(event))
    assert result.exit_code == 1
    assert "[failed] user: lookup_user" in result.stdout
    assert result.stderr.startswith("entraflow: step 'user': ")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param("{not json", "not JSON", id="not-json"),
        pytest.param("[1]", "a CloudEvent is a JSON object", id="not-an-object"),
        pytest.param(
            '{"specversion": "1.0", "id": "1", "source": "s"}',
            "not a CloudEvent: type missing or not a string",
            id="no-type",
        ),
    ],
)
def test_flows_test_refuses_a_bad_event_file(
    applied: Settings, tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "event.json"
    path.write_text(content, encoding="utf-8")
    result = run("flows", "test", "remove-leaver", "--event", str(path))
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["outcome"] == "invalid_input"
    assert message in result.stderr


def test_flows_test_of_an_unknown_flow_exits_1(applied: Settings) -> None:
    event = EXAMPLE_EVENTS / "employee-left.json"
    result = run("flows", "test", "nope", "--event", str(event))
    assert result.exit_code == 1
    assert "no flow named 'nope'" in result.stderr


@pytest.mark.integration
def test_the_installed_command_applies_the_examples(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENTRAFLOW_")}
    env["ENTRAFLOW_HOME"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "cli", "flows", "apply", str(EXAMPLE_FLOWS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "created    remove-leaver  (version 1)" in result.stdout
