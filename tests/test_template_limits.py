"""Templates are bounded in time and size: refused at `flows apply`, `invalid_input` at run time.

A hostile template must neither hang `flows apply` nor hold a worker or a scheduler: each case
below is refused quickly with an error naming the limit it went over. The per-test timeouts turn
a hang into a failure instead of a stuck suite.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from celery.exceptions import SoftTimeLimitExceeded
from click.testing import CliRunner

from cli.main import cli
from entraflow.celery_app import celery_config
from entraflow.settings import Settings
from entraflow.template_limits import MAX_OUTPUT_CHARS
from entraflow.templating import (
    TemplateProblem,
    condition_reads,
    evaluate_condition,
    render_value,
    template_reads,
)
from models.history import show_run
from scheduler.flows import FlowFileError, load_flows
from scheduler.runs import create_run
from worker import batch_tasks, tasks
from worker.actions import ActionResult
from worker.batch_tasks import ChunkResult
from worker.steps import StepFailed, execute_step

# Long enough for a slow shared machine, far shorter than a hostile template would take.
HANG_TIMEOUT_S = 30

TIME_LIMIT = "took longer than"
SIZE_LIMIT = "characters"
INTEGER_LIMIT = "bits"
ITEMS_LIMIT = "items"
# Which of the two stops a long loop first depends on the machine's speed.
LOOP_LIMIT = "iterations|took longer than"

# Each is refused when the flow is applied, before any event arrives.
HOSTILE_TEMPLATES = [
    pytest.param("{{ 9**(9**9) }}", INTEGER_LIMIT, id="power-of-issue-13"),
    pytest.param("{{ 9**(9**6) }}", INTEGER_LIMIT, id="power"),
    pytest.param("{{ 'a' * 3000000000 }}", SIZE_LIMIT, id="repetition-of-issue-13"),
    pytest.param("{{ 'ab' * 10000000 }}", SIZE_LIMIT, id="repetition"),
    pytest.param("{{ ['ab' * 1000] * 100000 }}", SIZE_LIMIT, id="list-repetition"),
    pytest.param("{{ ('a' * 200000) + ('b' * 200000) }}", SIZE_LIMIT, id="concatenation"),
    pytest.param("{{ 'a' | center(30000000) }}", SIZE_LIMIT, id="center-filter"),
    pytest.param("{{ 'a\\nb' | indent(30000000) }}", SIZE_LIMIT, id="indent-filter"),
    pytest.param(
        "{{ ('ab ' * 20000) | wordwrap(1, wrapstring='x' * 10000) }}",
        SIZE_LIMIT,
        id="wordwrap-filter",
    ),
    pytest.param("{{ 'a'.ljust(30000000) }}", SIZE_LIMIT, id="ljust-method"),
    pytest.param("{{ '%030000000d' % 1 }}", SIZE_LIMIT, id="percent-width"),
    pytest.param("{{ '%s' | format('a' * 300000) }}", SIZE_LIMIT, id="format-filter"),
    pytest.param("{{ '{:>30000000}'.format(1) }}", SIZE_LIMIT, id="format-width"),
    pytest.param("{{ ('{0}' * 1000).format('a' * 1000) }}", SIZE_LIMIT, id="format-repeats"),
    pytest.param("{{ ('x' * 100000).join(['a'] * 100) }}", SIZE_LIMIT, id="join-method"),
    pytest.param("{{ range(50000) | join('x' * 1000) }}", SIZE_LIMIT, id="join-filter"),
    pytest.param("{{ ('a' * 1000).replace('a', 'b' * 1000) }}", SIZE_LIMIT, id="replace"),
    pytest.param("{{ range(1000000000) | list }}", ITEMS_LIMIT, id="huge-range"),
    pytest.param("{{ [1] | batch(1000000000, 0) | list }}", ITEMS_LIMIT, id="batch-fill"),
    pytest.param(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        LOOP_LIMIT,
        id="nested-loops",
    ),
    pytest.param(
        "{% for i in range(100000) %}{{ ('a ' * 100000) | wordcount }}{% endfor %}",
        TIME_LIMIT,
        id="slow-loop",
    ),
    pytest.param(
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        SIZE_LIMIT,
        id="nested-loops-with-output",
    ),
    pytest.param(
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
        SIZE_LIMIT,
        id="doubling-by-concatenation",
    ),
    pytest.param(
        "{% set ns = namespace(l=['ab']) %}{% for i in range(64) %}"
        "{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l | string | length }}",
        SIZE_LIMIT,
        id="doubling-by-nesting",
    ),
    pytest.param(
        "{% set big %}{% for i in range(100000) %}{{ 'x' * 60000 }}{% endfor %}{% endset %}"
        "{{ big | length }}",
        SIZE_LIMIT,
        id="captured-block",
    ),
    # The parts after a value the event fills in are checked too.
    pytest.param("{{ event.data.upn }}{{ 9**(9**9) }}", INTEGER_LIMIT, id="after-an-event-read"),
]

# Templates as flows use them: they render as before.
LEGIT_TEMPLATES = [
    ("{{ event.data.upn }}", "ada@example.com"),
    ("{{ steps.user.id }}", "u-1"),
    ("{{ event.data.upn | upper }}", "ADA@EXAMPLE.COM"),
    ("{% set g = event.data.group_id %}{{ g }}", "g-1"),
    ("{{ event.data.upn ~ '/' ~ steps.user.id }}", "ada@example.com/u-1"),
    ("{{ '%s-%s' % (event.data.group_id, steps.user.id) }}", "g-1-u-1"),
    ("{{ '{}:{}'.format(event.data.group_id, 2 ** 10) }}", "g-1:1024"),
    ("{{ event.data.tags | join(',') }}", "a,b,c"),
    ("{% for t in event.data.tags %}{{ loop.index }}{{ t }}{% endfor %}", "1a2b3c"),
    ("{{ event.data.upn.split('@')[1] }}", "example.com"),
    ("{{ 'x' | center(5) }}", "  x  "),
    ("{{ range(3) | list }}", "[0, 1, 2]"),
    ("{{ {'a': [1, 2]} }}", "{'a': [1, 2]}"),
    ("{{ event.data.tags | length * 2 }}", "6"),
    ("{{ 'ab' * 3 }}", "ababab"),
    (
        "{{ event.data | tojson }}",
        '{"group_id": "g-1", "tags": ["a", "b", "c"], "upn": "ada@example.com"}',
    ),
]
LEGIT_CONTEXT: dict[str, Any] = {
    "event": {"data": {"upn": "ada@example.com", "group_id": "g-1", "tags": ["a", "b", "c"]}},
    "steps": {"user": {"id": "u-1", "jobTitle": "Engineer"}},
}

EVENT = {"specversion": "1.0", "id": "e1", "source": "tests", "type": "t", "data": {}}


@pytest.fixture
def unit_settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, database_url=database_url, redis_url="redis://unused")


def lookup(action: str, inputs: dict[str, Any]) -> ActionResult:
    return ActionResult(output={"id": "u-1", **inputs}, request_id="req")


def write_flow(folder: Path, template: str) -> Path:
    flow = {
        "name": "hostile",
        "trigger": {"type": "t"},
        "steps": [{"id": "user", "action": "lookup_user", "with": {"upn": template}}],
    }
    path = folder / "hostile.yaml"
    path.write_text(yaml.safe_dump(flow), encoding="utf-8")
    return path


@pytest.mark.timeout(HANG_TIMEOUT_S)
@pytest.mark.parametrize(("template", "limit"), HOSTILE_TEMPLATES)
def test_flow_validation_refuses_a_template_over_a_limit_naming_it(
    tmp_path: Path, template: str, limit: str
) -> None:
    path = write_flow(tmp_path, template)
    with pytest.raises(FlowFileError) as refused:
        load_flows(path)
    (problem,) = refused.value.problems
    assert problem.startswith(f"{path}: step 'user': with.upn: template ")
    assert "template limit" in problem
    assert re.search(limit, problem)


@pytest.mark.timeout(HANG_TIMEOUT_S)
@pytest.mark.parametrize(
    "condition",
    ["{{ 9**(9**9) > 0 }}", "('a' * 3000000000) | length > 1", "event.data.x or 10**100000"],
)
def test_a_condition_over_a_limit_is_refused_when_checked(condition: str) -> None:
    with pytest.raises(TemplateProblem, match="template limit"):
        condition_reads(condition)


@pytest.mark.timeout(HANG_TIMEOUT_S)
def test_flows_apply_refuses_a_hostile_trigger_condition_and_stores_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    flow = {
        "name": "hostile",
        "trigger": {"type": "t", "if": "{{ 9**(9**9) > 0 }}"},
        "steps": [{"id": "user", "action": "lookup_user", "with": {"upn": "{{ event.data.u }}"}}],
    }
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(flow), encoding="utf-8")
    result = CliRunner().invoke(cli, ["flows", "apply", str(path)], catch_exceptions=False)
    assert result.exit_code == 1
    first, *_ = result.stderr.splitlines()
    assert first.startswith(f"{path}: trigger.if: condition ")
    assert "template limit" in first and INTEGER_LIMIT in first
    listed = CliRunner().invoke(cli, ["flows", "list", "--json"], catch_exceptions=False)
    assert listed.stdout.strip() == "[]"


@pytest.mark.parametrize(("template", "rendered"), LEGIT_TEMPLATES)
def test_templates_as_flows_use_them_render_as_before(template: str, rendered: str) -> None:
    template_reads(template)
    assert render_value(template, LEGIT_CONTEXT) == rendered


def test_the_rendered_value_is_bounded_even_when_every_part_is_small() -> None:
    data = {"s": "a" * 1000}
    template = "{% for i in range(100) %}{{ event.data.s }}{% endfor %}"
    with pytest.raises(TemplateProblem, match=f"{MAX_OUTPUT_CHARS:,} characters"):
        render_value(template, {"event": {"data": data}})


def deeply_nested(depth: int) -> list[Any]:
    nested: list[Any] = []
    for _ in range(depth):
        nested = [nested]
    return nested


def test_deep_nesting_in_event_data_is_a_template_problem_not_a_crash() -> None:
    context = {"event": {"data": {"a": deeply_nested(100_000), "b": deeply_nested(100_000)}}}
    with pytest.raises(TemplateProblem):
        render_value("{{ event.data.a }}", context)
    with pytest.raises(TemplateProblem):
        evaluate_condition("{{ event.data.a == event.data.b }}", context)


def test_methods_that_build_values_out_of_proportion_are_not_reachable() -> None:
    for template in ("{{ (1).to_bytes(100000000, 'big') }}", "{{ 'a'.maketrans('a', 'b') }}"):
        with pytest.raises(TemplateProblem):
            render_value(template, {})


# At run time the hostile values come from the event: only the run can refuse them.
RUN_TIME_CASES = [
    pytest.param(
        {"upn": "{{ event.data.s * event.data.n }}"},
        None,
        {"s": "ab", "n": 20_000_000},
        SIZE_LIMIT,
        id="repetition",
    ),
    pytest.param(
        {"upn": "x"},
        "{{ event.data.n ** event.data.m > 0 }}",
        {"n": 9, "m": 1_000_000},
        INTEGER_LIMIT,
        id="power-in-a-condition",
    ),
    pytest.param(
        {
            "upn": "{% for i in range(event.data.n) %}{% for j in range(event.data.n) %}"
            "{% endfor %}{% endfor %}"
        },
        None,
        {"n": 100_000},
        LOOP_LIMIT,
        id="nested-loops",
    ),
    pytest.param(
        {
            "upn": "{% for i in event.data.l %}{% for j in event.data.l %}"
            "{% for k in event.data.l %}{% endfor %}{% endfor %}{% endfor %}"
        },
        None,
        {"l": list(range(10_000))},
        LOOP_LIMIT,
        id="loops-over-event-data",
    ),
    pytest.param(
        {"upn": "{% for i in range(event.data.n) %}{{ event.data.s | wordcount }}{% endfor %}"},
        None,
        {"n": 100_000, "s": "a " * 100_000},
        TIME_LIMIT,
        id="slow-loop",
    ),
]


@pytest.mark.timeout(HANG_TIMEOUT_S)
@pytest.mark.parametrize(("inputs", "condition", "data", "limit"), RUN_TIME_CASES)
def test_a_step_whose_template_goes_over_a_limit_fails_as_invalid_input_and_others_run(
    unit_settings: Settings,
    redis_client: redis.Redis,
    inputs: dict[str, str],
    condition: str | None,
    data: dict[str, Any],
    limit: str,
) -> None:
    steps = [{"id": "user", "action": "lookup_user", "with": inputs, "if": condition}]
    hostile = create_run(unit_settings, "f", steps, {**EVENT, "data": data})
    with pytest.raises(StepFailed) as failed:
        execute_step(unit_settings, redis_client, hostile, "user", "lookup_user", lookup)
    assert failed.value.error["outcome"] == "invalid_input"
    assert "template limit" in failed.value.error["message"]
    assert re.search(limit, failed.value.error["message"])
    run = show_run(unit_settings.resolved_database_url, hostile)
    assert run is not None and run["status"] == "failed"

    normal_steps = [{"id": "user", "action": "lookup_user", "with": {"upn": "{{ event.data.u }}"}}]
    normal = create_run(unit_settings, "f", normal_steps, {**EVENT, "data": {"u": "a@b.c"}})
    assert (
        execute_step(unit_settings, redis_client, normal, "user", "lookup_user", lookup)
        == "succeeded"
    )


def test_tasks_have_time_limits_within_the_visibility_timeout_above_a_steps_graph_time() -> None:
    settings = Settings()
    config = celery_config(settings)
    soft_s, hard_s = config["task_soft_time_limit"], config["task_time_limit"]
    assert soft_s < hard_s < settings.visibility_timeout_s
    # A step may spend its whole Graph retry time in process, the last request included.
    longest_step_s = (
        settings.max_graph_retry_time_s + settings.http_timeout_s + settings.max_inprocess_wait_s
    )
    assert soft_s > longest_step_s


def test_a_short_visibility_timeout_never_limits_a_task_below_its_longest_graph_time() -> None:
    # A batch chunk waiting a few seconds for the Graph budget, on a 5 s visibility timeout,
    # once ran into a 4 s limit until its deliveries ran out.
    settings = Settings(visibility_timeout_s=5)
    config = celery_config(settings)
    longest_step_s = (
        settings.max_graph_retry_time_s + settings.http_timeout_s + settings.max_inprocess_wait_s
    )
    assert longest_step_s < config["task_soft_time_limit"] < config["task_time_limit"]


def test_a_step_stopped_by_the_soft_time_limit_is_recorded_failed_naming_the_limit(
    unit_settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = [{"id": "user", "action": "lookup_user", "with": {"upn": "{{ event.data.u }}"}}]
    run_id = create_run(unit_settings, "f", steps, {**EVENT, "data": {"u": "a@b.c"}})

    def overrun(action: str, inputs: dict[str, Any]) -> ActionResult:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(tasks, "get_settings", lambda: unit_settings)
    monkeypatch.setattr(tasks, "lock_client", lambda: redis_client)
    monkeypatch.setattr(tasks, "perform", overrun)
    result = tasks.STEP_TASKS["lookup_user"].apply(args=(run_id, "user"))
    assert isinstance(result.result, StepFailed)
    run = show_run(unit_settings.resolved_database_url, run_id)
    assert run is not None and run["status"] == "failed"
    (step,) = run["steps"]
    assert step["status"] == "failed"
    assert "time limit" in step["error"]["message"]


def test_a_batch_chunk_stopped_by_the_soft_time_limit_runs_again_instead_of_being_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs: list[int] = []

    def overrun_once(settings: Settings, client: object, batch_id: str, chunk: int) -> ChunkResult:
        runs.append(chunk)
        if len(runs) == 1:
            raise SoftTimeLimitExceeded()
        return ChunkResult(batch_id, chunk, applied=1, outcomes={"added": 1})

    monkeypatch.setattr(batch_tasks, "run_chunk", overrun_once)
    monkeypatch.setattr(batch_tasks, "bulk_graph_client", lambda: None)
    monkeypatch.setattr(batch_tasks.apply_batch_chunk, "send_event", lambda *_, **__: None)
    result = batch_tasks.apply_batch_chunk.apply(args=("b-1", 3))
    assert runs == [3, 3]
    assert result.result == {"batch_id": "b-1", "chunk": 3, "applied": 1, "outcomes": {"added": 1}}
