"""`entraflow flows ...`: apply flow files, list and switch flows, and try one on an event."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from cli.output import fail_json, print_json
from entraflow.catalogue import ACTIONS
from entraflow.settings import get_settings
from entraflow.templating import TemplateProblem, evaluate_condition, render_inputs
from scheduler.flows import (
    FlowDefinition,
    FlowFileError,
    FlowNotFoundError,
    StepDefinition,
    apply_flows,
    get_flow,
    list_flows,
    set_enabled,
)
from worker.actions import ActionResult, run_action
from worker.addressing import group_path, user_path
from worker.errors import EntraflowError, InvalidInputError
from worker.graph import GraphClient

# The CloudEvents 1.0 attributes an event file must carry (data is optional).
REQUIRED_EVENT_ATTRIBUTES = ("specversion", "id", "source", "type")

Lookup = Callable[[str, Mapping[str, Any]], ActionResult]


@click.group()
def flows() -> None:
    """Apply, list, enable, disable and try out flow definitions."""


@flows.command("apply")
@click.argument("path", type=click.Path(path_type=Path))
def apply_command(path: Path) -> None:
    """Check the flow files at PATH (a file or a folder) and store them, or store nothing."""
    try:
        results = apply_flows(get_settings(), path)
    except FlowFileError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        click.echo(
            f"entraflow: {len(exc.problems)} problem(s) in the flow files; nothing was stored",
            err=True,
        )
        raise SystemExit(1) from exc
    for result in results:
        click.echo(f"{result.outcome.value:<9}  {result.name}  (version {result.version})")


@flows.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def list_command(as_json: bool) -> None:
    """List the stored flows."""
    found = list_flows(get_settings())
    if as_json:
        print_json(found)
        return
    table = Table("flow", "trigger", "enabled", "steps", "version", "updated", "source")
    for flow in found:
        table.add_row(
            flow["name"],
            flow["trigger"],
            "yes" if flow["enabled"] else "no",
            str(flow["steps"]),
            str(flow["version"]),
            f"{flow['updated_at']:%Y-%m-%d %H:%M:%S}",
            flow["source"] or "",
        )
    Console().print(table)


@flows.command("enable")
@click.argument("name")
def enable_command(name: str) -> None:
    """Let events start runs of flow NAME."""
    _set_enabled(name, enabled=True)


@flows.command("disable")
@click.argument("name")
def disable_command(name: str) -> None:
    """Stop events from starting runs of flow NAME; runs already queued go on."""
    _set_enabled(name, enabled=False)


def _set_enabled(name: str, *, enabled: bool) -> None:
    try:
        set_enabled(get_settings(), name, enabled)
    except FlowNotFoundError as exc:
        fail_json({"outcome": "not_found", "message": str(exc)})
    click.echo(f"{'enabled' if enabled else 'disabled'}  {name}")


@flows.command("test")
@click.argument("name")
@click.option(
    "--event",
    "event_file",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="A CloudEvent as a JSON file.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def test_command(name: str, event_file: Path, as_json: bool) -> None:
    """Show what a run of flow NAME would do for an event; lookups run, writes are not sent."""
    settings = get_settings()
    try:
        flow = get_flow(settings, name)
    except FlowNotFoundError as exc:
        fail_json({"outcome": "not_found", "message": str(exc)})
    event = _read_event(event_file)
    # A person at a terminal can wait out a long Retry-After; there is no queue to go back to.
    patient = settings.model_copy(update={"max_inprocess_wait_s": settings.max_graph_retry_time_s})
    # Built on first use: a flow that looks nothing up needs no Graph connection.
    client = cache(lambda: GraphClient.from_settings(patient))
    report = dry_run(flow, event, lambda action, inputs: run_action(client(), action, inputs))
    if as_json:
        print_json(report)
    else:
        _echo_report(report)
    error = report["error"]
    if error is not None:
        click.echo(f"entraflow: {error['message']}", err=True)
        raise SystemExit(1)


def dry_run(flow: FlowDefinition, event: Mapping[str, Any], lookup: Lookup) -> dict[str, Any]:
    """What a run of `flow` would do for `event`: lookups run through `lookup`; writes are not."""
    trigger_if = flow.trigger.if_
    report: dict[str, Any] = {
        "flow": flow.name,
        "event": {key: event.get(key) for key in ("id", "source", "type")},
        "trigger": {"type": flow.trigger.type, "if": trigger_if, "if_result": None},
        "matches": False,
        "steps": [],
        "error": None,
    }
    if event.get("type") != flow.trigger.type:
        return report
    if trigger_if is not None:
        try:
            report["trigger"]["if_result"] = evaluate_condition(trigger_if, {"event": event})
        except TemplateProblem as exc:
            report["error"] = {"outcome": "invalid_input", "message": f"trigger.if: {exc}"}
            return report
        if not report["trigger"]["if_result"]:
            return report
    report["matches"] = True
    outputs: dict[str, Any] = {}
    for step in flow.steps:
        entry = _dry_run_step(step, {"event": event, "steps": outputs}, lookup)
        report["steps"].append(entry)
        if entry["error"] is not None:
            report["error"] = {**entry["error"], "step": step.id}
            break
        # A skipped step's output is empty in a real run too.
        outputs[step.id] = entry["output"] or {}
    return report


def _dry_run_step(
    step: StepDefinition, variables: Mapping[str, Any], lookup: Lookup
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": step.id,
        "action": step.action,
        "if_result": None,
        "status": "failed",
        "inputs": None,
        "output": None,
        "plan": None,
        "error": None,
    }
    try:
        if step.if_ is not None:
            entry["if_result"] = evaluate_condition(step.if_, variables)
            if not entry["if_result"]:
                entry["status"] = "skipped"
                return entry
        entry["inputs"] = inputs = render_inputs(step.with_, variables)
        if ACTIONS[step.action].writes:
            entry["plan"], entry["output"] = _plan_write(step.action, inputs)
            entry["status"] = "planned"
        else:
            entry["output"] = lookup(step.action, inputs).output
            entry["status"] = "succeeded"
    except TemplateProblem as exc:
        entry["error"] = {"outcome": "invalid_input", "message": f"step {step.id!r}: {exc}"}
    except EntraflowError as exc:
        entry["error"] = {**exc.to_dict(), "message": f"step {step.id!r}: {exc}"}
    return entry


def _plan_write(action: str, inputs: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The sentence and assumed output of a write, its inputs checked as the action would."""
    user_id, group_id = inputs.get("user_id"), inputs.get("group_id")
    if not isinstance(user_id, str) or not isinstance(group_id, str):
        raise InvalidInputError(f"{action} needs user_id and group_id as strings")
    # The same addressing checks the action makes before its first request.
    user_path(user_id)
    group_path(group_id)
    spec = ACTIONS[action]
    # Later steps are shown the output of the write as if it changed something.
    output = {"success": True, "outcome": spec.outcomes[0]}
    return "would " + spec.change.format(user_id=user_id, group_id=group_id), output


def _read_event(event_file: Path) -> dict[str, Any]:
    def refuse(reason: str) -> NoReturn:
        fail_json({"outcome": "invalid_input", "message": f"{event_file}: {reason}"})

    try:
        event = json.loads(event_file.read_text(encoding="utf-8"))
    except OSError as exc:
        refuse(f"cannot read the file: {exc.strerror}")
    except ValueError as exc:
        refuse(f"not JSON: {exc}")
    if not isinstance(event, dict):
        refuse("a CloudEvent is a JSON object")
    missing = [key for key in REQUIRED_EVENT_ATTRIBUTES if not isinstance(event.get(key), str)]
    if missing:
        refuse(f"not a CloudEvent: {', '.join(missing)} missing or not a string")
    return event


def _echo_report(report: dict[str, Any]) -> None:
    event, trigger = report["event"], report["trigger"]
    click.echo(
        f"flow {report['flow']}, event {event['id']} ({event['type']} from {event['source']})"
    )
    if event["type"] != trigger["type"]:
        click.echo(f"  no run: the flow is triggered by {trigger['type']}")
        return
    if trigger["if"] is not None:
        click.echo(f"  trigger if {trigger['if']} -> {json.dumps(trigger['if_result'])}")
    if not report["matches"]:
        if report["error"] is None:
            click.echo("  no run: the trigger condition is false")
        return
    for step in report["steps"]:
        click.echo(f"  [{step['status']}] {step['id']}: {step['action']}")
        if step["if_result"] is not None:
            click.echo(f"      if -> {json.dumps(step['if_result'])}")
        if step["inputs"] is not None:
            click.echo(f"      inputs: {json.dumps(step['inputs'])}")
        if step["plan"] is not None:
            click.echo(f"      {step['plan']} (not sent)")
        elif step["output"] is not None:
            click.echo(f"      output: {json.dumps(step['output'])}")
    if report["error"] is None:
        click.echo("Nothing was written to Graph.")
