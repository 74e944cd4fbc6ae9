"""Log lines: JSON with the ids of the work at hand, plain text for a terminal, no secrets."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from entraflow.logs import JsonFormatter, PlainFormatter, bind, bound, formatter_for
from entraflow.settings import LogFormat, Settings
from harness.stack import LocalStack
from harness.waiting import wait_until
from models.db import session_scope
from models.flows import Flow
from sandbox.directory import DEMO_USERS, SANDBOX_CLIENT_SECRET
from scheduler.flows import FlowDefinition
from scheduler.producer import publish_event

HIRED = "hr.employee.hired"
UNKNOWN_GROUP_ID = "00000000-0000-4000-8000-00000000dead"
FLOW = {
    "name": "add-to-missing-group",
    "trigger": {"type": HIRED},
    "steps": [
        {"id": "user", "action": "lookup_user", "with": {"upn": "{{ event.data.upn }}"}},
        {
            "id": "add",
            "action": "add_user_to_group",
            "with": {"user_id": "{{ steps.user.id }}", "group_id": "{{ event.data.group_id }}"},
        },
    ],
}
WAIT_S = 60.0
SUBPROCESS_TIMEOUT_S = 30.0
LOG_LINE_FIELDS = {"time", "level", "logger", "message"}
# Logs one line the way the CLI sets logging up, with a run bound.
LOG_ONE_LINE = (
    "import logging\n"
    "from entraflow.logs import bound, configure\n"
    "from entraflow.settings import get_settings\n"
    "configure(logging.INFO, get_settings().log_format)\n"
    "with bound(run_id='run-1'):\n"
    "    logging.getLogger('entraflow.test').warning('hello %s', 'there')\n"
)


def render(formatter: logging.Formatter, message: str, *args: object) -> str:
    record = logging.LogRecord("entraflow.test", logging.WARNING, __file__, 1, message, args, None)
    return formatter.format(record)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_json_line_carries_the_ids_bound_and_only_those() -> None:
    with bound(run_id="run-1", step_id="add", batch_id=None):
        bind(event_id="evt-1")
        line = json.loads(render(JsonFormatter(), "step %s failed", "add"))
    outside = json.loads(render(JsonFormatter(), "idle"))

    assert set(line) == LOG_LINE_FIELDS | {"run_id", "step_id", "event_id"}
    assert line["message"] == "step add failed"
    assert line["level"] == "WARNING" and line["logger"] == "entraflow.test"
    assert (line["run_id"], line["step_id"], line["event_id"]) == ("run-1", "add", "evt-1")
    assert set(outside) == LOG_LINE_FIELDS


def test_an_id_bound_outside_a_block_does_not_stick_to_later_lines() -> None:
    bind(event_id="evt-stray")

    assert "event_id" not in json.loads(render(JsonFormatter(), "later"))


def test_auto_format_is_plain_for_a_terminal_and_json_elsewhere() -> None:
    assert isinstance(formatter_for(Terminal(), LogFormat.AUTO), PlainFormatter)
    assert isinstance(formatter_for(io.StringIO(), LogFormat.AUTO), JsonFormatter)
    assert isinstance(formatter_for(Terminal(), LogFormat.JSON), JsonFormatter)
    assert isinstance(formatter_for(io.StringIO(), LogFormat.PLAIN), PlainFormatter)


def test_plain_lines_show_the_ids_as_tags() -> None:
    with bound(batch_id="b-7"):
        line = render(PlainFormatter(), "chunk done")

    assert line.endswith("WARNING entraflow.test: chunk done [batch_id=b-7]")


@pytest.mark.parametrize("formatter", [JsonFormatter(), PlainFormatter()])
def test_a_bearer_token_in_a_message_is_redacted(formatter: logging.Formatter) -> None:
    line = render(formatter, "refused: Authorization: Bearer %s", "eyJ0eXAi.secret.sig")

    assert "eyJ0eXAi" not in line
    assert "Bearer [redacted]" in line


def test_the_cli_logs_json_to_a_pipe_and_plain_text_to_a_terminal() -> None:
    env = {**os.environ, "ENTRAFLOW_LOG_FORMAT": "auto"}
    piped = subprocess.run(
        [sys.executable, "-c", LOG_ONE_LINE],
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=True,
    )
    line = json.loads(piped.stderr)
    assert (line["message"], line["run_id"]) == ("hello there", "run-1")

    controller, terminal = os.openpty()
    try:
        subprocess.run(
            [sys.executable, "-c", LOG_ONE_LINE],
            env=env,
            stderr=terminal,
            stdout=subprocess.DEVNULL,
            timeout=SUBPROCESS_TIMEOUT_S,
            check=True,
        )
        text = os.read(controller, 4096).decode()
    finally:
        os.close(terminal)
        os.close(controller)
    assert "WARNING entraflow.test: hello there [run_id=run-1]" in text
    assert not text.lstrip().startswith("{")


@pytest.fixture
def logging_stack(settings: Settings) -> Iterator[LocalStack]:
    """A worker and a scheduler writing their logs (JSON: files are no terminal) to the home."""
    local = LocalStack(
        home=settings.home,
        redis_url=settings.redis_url,
        database_url=settings.database_url,
        schedulers=1,
    )
    with local:
        yield local


@pytest.mark.integration
def test_worker_and_scheduler_lines_carry_run_step_and_event_ids_and_no_secret(
    logging_stack: LocalStack, redis_client: redis.Redis
) -> None:
    stack = logging_stack
    definition = FlowDefinition.model_validate(FLOW)
    with session_scope(stack.settings.resolved_database_url) as session:
        session.add(
            Flow(
                name=definition.name,
                trigger_type=definition.trigger.type,
                definition=definition.model_dump(by_alias=True),
            )
        )
    data = {"upn": DEMO_USERS["nestor"].upn, "group_id": UNKNOWN_GROUP_ID}
    publish_event(redis_client, type=HIRED, source="hr", id="hire-9", data=data)

    worker_log = stack.home / "worker-0.log"
    # The step's own line; a pool process's first step may also log its database's migration.
    failed = wait_for_line(
        worker_log, lambda line: line.get("step_id") == "add" and line["logger"] == "worker.tasks"
    )
    assert failed["level"] == "WARNING"
    assert failed["run_id"] and failed["action"] == "add_user_to_group"
    scheduler_log = stack.home / "scheduler-0.log"
    accepted = wait_for_line(scheduler_log, lambda line: "hr/hire-9" in line["message"])
    assert accepted["event_id"] == "hire-9" and accepted["stream_id"]

    for path in (worker_log, scheduler_log):
        assert SANDBOX_CLIENT_SECRET not in path.read_text()
        assert all(set(json.loads(line)) >= LOG_LINE_FIELDS for line in complete_lines(path))


def wait_for_line(path: Path, matches: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    def matching_line() -> dict[str, Any] | None:
        lines = complete_lines(path) if path.exists() else []
        parsed = (json.loads(line) for line in lines)
        return next((dict(line) for line in parsed if matches(line)), None)

    return wait_until(matching_line, f"a matching line in {path}", timeout_s=WAIT_S)


def complete_lines(path: Path) -> list[str]:
    """The lines of a log a process may still be writing, without the one it is in the middle of."""
    text = path.read_text()
    return text[: text.rfind("\n") + 1].splitlines()
