"""compose.yaml cannot run here (no Docker), so it is read and checked against what tests run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
# The entraflow commands the test suite starts as real processes (tests/test_flower.py,
# tests/test_scheduler_processes.py, the stack fixture's workers).
COMMANDS_THE_TESTS_RUN = {"worker", "scheduler", "flower"}
SECRET_VARIABLES = {"ENTRAFLOW_CLIENT_SECRET", "FLOWER_BASIC_AUTH"}


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_every_entraflow_service_runs_a_command_the_tests_run() -> None:
    services = compose()["services"]
    ours = {name: s for name, s in services.items() if "build" in s}
    assert set(ours) == {"worker", "scheduler", "flower"}
    for name, service in ours.items():
        command = service["command"]
        assert command[0] == "entraflow", name
        assert command[1] in COMMANDS_THE_TESTS_RUN, name


def test_services_wait_for_a_healthy_redis_that_keeps_an_append_only_file() -> None:
    services = compose()["services"]
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert redis["healthcheck"]["test"]
    for name in ("worker", "scheduler", "flower"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_secrets_come_only_from_the_environment_and_fail_fast_when_missing() -> None:
    text = (ROOT / "compose.yaml").read_text()
    for variable in SECRET_VARIABLES | {"ENTRAFLOW_TENANT_ID", "ENTRAFLOW_CLIENT_ID"}:
        assert re.search(rf"\$\{{{variable}:\?[^}}]+\}}", text), variable
    assert "sandbox-secret" not in text


def test_every_variable_compose_reads_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    text = (ROOT / "compose.yaml").read_text()
    for variable in set(re.findall(r"\$\{([A-Z_]+)", text)):
        assert variable in readme, variable
