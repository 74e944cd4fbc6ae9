"""`entraflow action ...`: run one Entra action now, without the queue, and print its output.

Each action of the catalogue is a subcommand, named after it with dashes, with an option per
input.
"""

from __future__ import annotations

from typing import Any

import click

from cli.output import fail_json, print_json
from entraflow.catalogue import ACTIONS, ActionSpec
from entraflow.settings import get_settings
from worker.actions import run_action
from worker.errors import EntraflowError, GraphError
from worker.graph import GraphClient


def _run(name: str, inputs: dict[str, Any]) -> None:
    settings = get_settings()
    # A person at a terminal can wait out a long Retry-After; there is no queue to go back to.
    patient = settings.model_copy(update={"max_inprocess_wait_s": settings.max_graph_retry_time_s})
    try:
        result = run_action(GraphClient.from_settings(patient), name, inputs)
    except GraphError as exc:
        fail_json(exc.to_dict())
    except EntraflowError as exc:
        fail_json({"outcome": getattr(exc, "outcome", "invalid_input"), "message": str(exc)})
    print_json(result.output)


# The option of each input, in the order `--help` lists them and its help text.
INPUT_HELP = {
    "user_id": "The user's object id (a GUID) or user principal name.",
    "upn": "The user's user principal name.",
    "email": "The user's mail address; it must match exactly one user.",
    "group_id": "The group's object id (a GUID).",
}


@click.group()
def action() -> None:
    """Run one Entra action now and print its output as JSON."""


def _option(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _command(spec: ActionSpec) -> click.Command:
    """The subcommand of one catalogue action: an option per input."""

    def run(**given: str | None) -> None:
        inputs = {name: value for name, value in given.items() if value is not None}
        # An empty value counts as absent, as it does for the action.
        if spec.one_of and len([name for name in spec.one_of if inputs.get(name)]) != 1:
            options = ", ".join(_option(name) for name in INPUT_HELP if name in spec.one_of)
            raise click.UsageError(f"give exactly one of {options}")
        _run(spec.name, inputs)

    options: list[click.Parameter] = [
        click.Option([_option(name)], required=name in spec.required_inputs, help=INPUT_HELP[name])
        for name in INPUT_HELP
        if name in spec.inputs
    ]
    return click.Command(
        spec.name.replace("_", "-"), callback=run, params=options, help=spec.summary
    )


for _spec in ACTIONS.values():
    action.add_command(_command(_spec))
