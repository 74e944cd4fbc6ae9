"""Flow files: every problem found and named before anything is stored; storing and switching."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from entraflow.settings import Settings
from models.db import session_scope
from scheduler.flows import (
    ApplyOutcome,
    ApplyResult,
    FlowFileError,
    FlowNotFoundError,
    apply_flows,
    enabled_flows_for,
    get_flow,
    list_flows,
    load_flows,
    set_enabled,
)

EXAMPLE_FLOWS = Path(__file__).parent.parent / "entraflow" / "examples" / "flows"

GOOD_FLOW: dict[str, Any] = {
    "name": "add-new-sales-hire",
    "trigger": {"type": "hr.employee.hired", "if": "{{ event.data.department == 'Sales' }}"},
    "steps": [
        {"id": "user", "action": "lookup_user", "with": {"user_id": "{{ event.data.user_id }}"}},
        {
            "id": "add",
            "action": "add_user_to_group",
            "with": {"user_id": "{{ steps.user.id }}", "group_id": "{{ event.data.group_id }}"},
            "if": "{{ steps.user.jobTitle != 'Contractor' }}",
        },
    ],
}

Change = Callable[[dict[str, Any]], None]


def write_flow(folder: Path, change: Change | None = None, *, file_name: str = "a.yaml") -> Path:
    flow = copy.deepcopy(GOOD_FLOW)
    if change is not None:
        change(flow)
    path = folder / file_name
    path.write_text(yaml.safe_dump(flow, sort_keys=False), encoding="utf-8")
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(FlowFileError) as caught:
        load_flows(path)
    return caught.value.problems


def step(flow: dict[str, Any], step_id: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in flow["steps"] if s["id"] == step_id)
    return found


def test_a_good_flow_loads_as_written(tmp_path: Path) -> None:
    (flow,) = load_flows(write_flow(tmp_path))
    assert flow.name == "add-new-sales-hire"
    assert flow.trigger.if_ == GOOD_FLOW["trigger"]["if"]
    assert flow.step_dicts() == [{**GOOD_FLOW["steps"][0], "if": None}, GOOD_FLOW["steps"][1]]


def test_the_example_flows_pass_validation() -> None:
    names = [flow.name for flow in load_flows(EXAMPLE_FLOWS)]
    assert names == [
        "add-new-sales-hire",
        "grant-project-access",
        "membership-round-trip",
        "remove-leaver",
    ]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        pytest.param(
            lambda f: step(f, "add").update(action="add_user"),
            "step 'add': unknown action 'add_user'; known: add_user_to_group, lookup_group, "
            "lookup_user, remove_member_from_group",
            id="unknown-action",
        ),
        pytest.param(
            lambda f: step(f, "add")["with"].pop("group_id"),
            "step 'add': missing input 'group_id' for add_user_to_group",
            id="missing-input",
        ),
        pytest.param(
            lambda f: step(f, "add")["with"].update(group="x"),
            "step 'add': unknown input 'group' for add_user_to_group; it takes group_id, user_id",
            id="unknown-input",
        ),
        pytest.param(
            lambda f: step(f, "user")["with"].update(upn="a@contoso.example"),
            "step 'user': lookup_user needs exactly one of email, upn, user_id; got upn, user_id",
            id="lookup-user-two-ways",
        ),
        pytest.param(
            lambda f: step(f, "user").update({"with": {}}),
            "step 'user': lookup_user needs exactly one of email, upn, user_id; got none",
            id="lookup-user-no-way",
        ),
        pytest.param(
            lambda f: step(f, "add")["with"].update(group_id=42),
            "step 'add': with.group_id: must be a string, not int",
            id="input-not-a-string",
        ),
        pytest.param(
            lambda f: step(f, "add")["with"].update(group_id="{{ event.data.group_id }"),
            "step 'add': with.group_id: template '{{ event.data.group_id }': unexpected '}'",
            id="template-does-not-parse",
        ),
        pytest.param(
            lambda f: step(f, "add")["with"].update(group_id="{{ event.data.g | nosuch }}"),
            "step 'add': with.group_id: template '{{ event.data.g | nosuch }}': "
            "No filter named 'nosuch'.",
            id="unknown-filter",
        ),
        pytest.param(
            lambda f: step(f, "add").update({"if": "{{ steps.user.jobTitle == }}"}),
            "step 'add': if: condition '{{ steps.user.jobTitle == }}': "
            "unexpected 'end of template'",
            id="condition-does-not-parse",
        ),
        pytest.param(
            lambda f: step(f, "user")["with"].update(user_id="{{ steps.add.id }}"),
            "step 'user': with.user_id: reads steps.add, a step that runs later",
            id="later-step",
        ),
        pytest.param(
            lambda f: step(f, "add").update({"if": "{{ steps.add.success }}"}),
            "step 'add': if: reads steps.add, its own output",
            id="own-step",
        ),
        pytest.param(
            lambda f: step(f, "add")["with"].update(user_id="{{ steps['usr'].id }}"),
            "step 'add': with.user_id: reads steps.usr, but the flow has no step 'usr'",
            id="unknown-step",
        ),
        pytest.param(
            lambda f: step(f, "add")["with"].update(user_id="{{ steps[event.data.s].id }}"),
            "step 'add': with.user_id: reads steps[...] with a computed name; "
            "name the step: steps.<id>",
            id="computed-step",
        ),
        pytest.param(
            lambda f: step(f, "add")["with"].update(group_id="{{ evnt.data.group_id }}"),
            "step 'add': with.group_id: unknown name 'evnt'; templates read 'event' and 'steps'",
            id="unknown-name",
        ),
        pytest.param(
            lambda f: f["trigger"].update({"if": "{{ steps.user.id }}"}),
            "trigger.if: reads 'steps'; a trigger condition reads only 'event'",
            id="trigger-reads-steps",
        ),
        pytest.param(
            lambda f: f["trigger"].update({"if": "{{ event.data.x == }}"}),
            "trigger.if: condition '{{ event.data.x == }}': unexpected 'end of template'",
            id="trigger-condition-does-not-parse",
        ),
        pytest.param(
            lambda f: f.update(name=""),
            "name: must not be empty",
            id="empty-name",
        ),
        pytest.param(
            lambda f: f.update(name="sales hire"),
            "name 'sales hire': use letters, digits, '-', '_' and '.', "
            "starting with a letter or a digit",
            id="unsafe-name",
        ),
        pytest.param(
            lambda f: f["trigger"].update(type=" "),
            "trigger.type: must not be empty",
            id="empty-trigger-type",
        ),
        pytest.param(
            lambda f: f.update(steps=[]),
            "steps: a flow needs at least one step",
            id="no-steps",
        ),
        pytest.param(
            lambda f: step(f, "add").update(id="user"),
            "step 'user': duplicate step id",
            id="duplicate-step-id",
        ),
        pytest.param(
            lambda f: step(f, "add").update(id="add-1"),
            "step 'add-1': the id must be letters, digits and '_', not starting with a digit, "
            "so that templates can read it as steps.<id>",
            id="step-id-not-an-identifier",
        ),
        pytest.param(
            lambda f: step(f, "add").update(when="{{ true }}"),
            "step 'add': unknown key 'when'",
            id="unknown-step-key",
        ),
        pytest.param(
            lambda f: f["trigger"].update(filter="x"),
            "unknown key 'trigger.filter'",
            id="unknown-trigger-key",
        ),
        pytest.param(
            lambda f: f.pop("trigger"),
            "missing key 'trigger'",
            id="missing-trigger",
        ),
        pytest.param(
            lambda f: step(f, "add").pop("action"),
            "step 'add': missing key 'action'",
            id="missing-action",
        ),
    ],
)
def test_each_problem_is_named_with_its_file_and_step(
    tmp_path: Path, change: Change, problem: str
) -> None:
    path = write_flow(tmp_path, change)
    assert problems_of(path) == [f"{path}: {problem}"]


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text("name: x\ntrigger: [\n", encoding="utf-8")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: YAML syntax, line 3 column 1: ")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "the file is empty"),
        ("- a\n- b\n", "a flow file holds a mapping (name, trigger, steps), not a list"),
    ],
)
def test_a_file_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(text, encoding="utf-8")
    assert problems_of(path) == [f"{path}: {problem}"]


def test_a_path_without_flow_files_is_refused(tmp_path: Path) -> None:
    assert problems_of(tmp_path) == [f"{tmp_path}: no .yaml or .yml files in this folder"]
    assert problems_of(tmp_path / "nope.yaml") == [
        f"{tmp_path / 'nope.yaml'}: no such file or folder"
    ]
    text_file = tmp_path / "flow.txt"
    text_file.write_text("name: x\n", encoding="utf-8")
    assert problems_of(text_file) == [f"{text_file}: not a .yaml or .yml file"]


def test_every_problem_of_every_file_is_reported_together(tmp_path: Path) -> None:
    def broken(flow: dict[str, Any]) -> None:
        flow["name"] = "broken"
        step(flow, "add").update(action="add_user")
        step(flow, "user")["with"] = {"user_id": "{{ steps.add.id }}"}

    first = write_flow(tmp_path, broken, file_name="a.yaml")
    second = write_flow(tmp_path, lambda f: f.pop("steps"), file_name="b.yml")
    duplicate = write_flow(tmp_path, file_name="c.yaml")
    same_name = write_flow(tmp_path, file_name="d.yaml")
    assert problems_of(tmp_path) == [
        f"{first}: step 'user': with.user_id: reads steps.add, a step that runs later",
        f"{first}: step 'add': unknown action 'add_user'; known: add_user_to_group, "
        "lookup_group, lookup_user, remove_member_from_group",
        f"{second}: missing key 'steps'",
        f"{same_name}: flow name 'add-new-sales-hire' is also used by {duplicate}",
    ]


def test_templates_may_set_their_own_names_and_literals_are_not_templates(
    tmp_path: Path,
) -> None:
    def change(flow: dict[str, Any]) -> None:
        step(flow, "add")["with"]["group_id"] = (
            "{% set g = event.data.group_id %}{{ g }}"  # a name the template sets itself
        )
        step(flow, "user")["with"]["user_id"] = "50%} off"  # no brace: never rendered

    (flow,) = load_flows(write_flow(tmp_path, change))
    assert flow.steps[0].with_["user_id"] == "50%} off"


def test_apply_creates_then_leaves_unchanged_then_updates_with_a_new_version(
    settings: Settings, tmp_path: Path
) -> None:
    path = write_flow(tmp_path)
    name = GOOD_FLOW["name"]
    assert apply_flows(settings, path) == [ApplyResult(name, ApplyOutcome.CREATED, 1)]
    assert apply_flows(settings, path) == [ApplyResult(name, ApplyOutcome.UNCHANGED, 1)]
    write_flow(tmp_path, lambda f: f["trigger"].update(type="hr.employee.rehired"))
    assert apply_flows(settings, path) == [ApplyResult(name, ApplyOutcome.UPDATED, 2)]
    (stored,) = list_flows(settings)
    assert stored["version"] == 2
    assert stored["trigger"] == "hr.employee.rehired"
    assert stored["source"] == str(path.resolve())
    assert stored["steps"] == 2
    assert get_flow(settings, name).trigger.type == "hr.employee.rehired"


def test_files_with_any_problem_store_nothing(settings: Settings, tmp_path: Path) -> None:
    write_flow(tmp_path, file_name="a.yaml")
    write_flow(tmp_path, lambda f: f.update(name="second"), file_name="b.yaml")
    apply_flows(settings, tmp_path)
    write_flow(tmp_path, lambda f: f["trigger"].update(type="changed"), file_name="a.yaml")
    write_flow(
        tmp_path,
        lambda f: f.update(name="third", steps=[{"id": "x", "action": "nope"}]),
        file_name="c.yaml",
    )
    with pytest.raises(FlowFileError):
        apply_flows(settings, tmp_path)
    stored = list_flows(settings)
    assert [(f["name"], f["trigger"], f["version"]) for f in stored] == [
        ("add-new-sales-hire", "hr.employee.hired", 1),
        ("second", "hr.employee.hired", 1),
    ]


def test_an_applied_flow_keeps_its_enabled_flag(settings: Settings, tmp_path: Path) -> None:
    path = write_flow(tmp_path)
    apply_flows(settings, path)
    set_enabled(settings, GOOD_FLOW["name"], False)
    write_flow(tmp_path, lambda f: step(f, "add").update({"if": None}))
    assert apply_flows(settings, path)[0].outcome is ApplyOutcome.UPDATED
    assert list_flows(settings)[0]["enabled"] is False


def test_enabled_flows_for_honours_the_flag_and_the_event_type(
    settings: Settings, tmp_path: Path
) -> None:
    def leaver(flow: dict[str, Any]) -> None:
        flow.update(name="leaver")
        flow["trigger"].update(type="hr.employee.left")

    write_flow(tmp_path, lambda f: f.update(name="b-hire"), file_name="b.yaml")
    write_flow(tmp_path, lambda f: f.update(name="a-hire"), file_name="a.yaml")
    write_flow(tmp_path, leaver, file_name="c.yaml")
    apply_flows(settings, tmp_path)
    url = settings.resolved_database_url

    def enabled(event_type: str) -> list[str]:
        with session_scope(url) as session:
            return [flow.name for flow in enabled_flows_for(session, event_type)]

    assert enabled("hr.employee.hired") == ["a-hire", "b-hire"]
    set_enabled(settings, "a-hire", False)
    assert enabled("hr.employee.hired") == ["b-hire"]
    assert enabled("hr.employee.left") == ["leaver"]
    set_enabled(settings, "a-hire", True)
    assert enabled("hr.employee.hired") == ["a-hire", "b-hire"]


def test_an_unknown_flow_name_raises_flow_not_found(settings: Settings) -> None:
    with pytest.raises(FlowNotFoundError, match="no flow named 'nope'"):
        set_enabled(settings, "nope", True)
    with pytest.raises(FlowNotFoundError):
        get_flow(settings, "nope")
