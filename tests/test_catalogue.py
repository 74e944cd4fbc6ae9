"""The catalogue is the one list: the worker, the command line, the routes and README agree."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from cli.action import INPUT_HELP, action
from entraflow import keys
from entraflow.catalogue import (
    ACTIONS,
    BATCH_CHUNK_TASK,
    BATCH_START_TASK,
    TASK_PREFIX,
    TASK_QUEUES,
)
from entraflow.celery_app import EntraflowTask, app
from worker import batch_tasks, tasks
from worker.actions import FUNCTIONS

CELERY_PREFIX = "celery."
README = Path(__file__).resolve().parents[1] / "README.md"
# README's sentence on action outputs: "`lookup_user` gives `id, ...`; `lookup_group` gives ...".
OUTPUTS_SENTENCE = re.compile(r"Action outputs use Graph's names: (?P<list>.*?)\. ")
ACTION_OUTPUTS = re.compile(r"`(?P<name>\w+)` gives (?P<outputs>[^;]*)")
# README's list of step tasks: "a Celery chain of immutable step tasks (`entra.lookup_user`, ...)".
STEP_TASKS_SENTENCE = re.compile(r"immutable step tasks \((?P<list>[^)]*)\)")


def _words(text: str) -> list[str]:
    """The names quoted in `text`, a quoted list split at its commas."""
    return [word.strip() for quoted in re.findall(r"`([^`]*)`", text) for word in quoted.split(",")]


def _readme() -> str:
    return " ".join(README.read_text(encoding="utf-8").split())


@pytest.mark.parametrize("name", list(ACTIONS))
def test_every_action_has_a_worker_function_taking_exactly_its_inputs(name: str) -> None:
    spec = ACTIONS[name]
    # The keyword parameters after the client are the inputs; those without a default required.
    parameters = list(inspect.signature(FUNCTIONS[name]).parameters.values())[1:]
    assert {p.name for p in parameters} == spec.inputs
    assert {p.name for p in parameters if p.default is inspect.Parameter.empty} == (
        spec.required_inputs
    )


def test_the_worker_has_no_function_the_catalogue_does_not_list() -> None:
    assert list(FUNCTIONS) == list(ACTIONS)


@pytest.mark.parametrize("name", list(ACTIONS))
def test_every_action_has_a_step_task_named_after_it(name: str) -> None:
    task = app.tasks[ACTIONS[name].task_name]
    assert task.name == tasks.STEP_TASKS[name].name
    assert isinstance(task, tasks.StepTask)
    assert task.action == name
    assert task.name == f"entra.{name}"


def test_every_entraflow_task_has_the_one_prefix_and_a_queue_from_the_catalogue() -> None:
    # Celery's own tasks (celery.chain, ...) share the base class but are never sent.
    ours = {name for name in app.tasks if not name.startswith(CELERY_PREFIX)}
    assert ours == set(TASK_QUEUES)
    assert all(name.startswith(TASK_PREFIX) for name in ours)
    assert all(isinstance(app.tasks[name], EntraflowTask) for name in ours)
    assert batch_tasks.start_batch.name == BATCH_START_TASK
    assert batch_tasks.apply_batch_chunk.name == BATCH_CHUNK_TASK


@pytest.mark.parametrize("name", sorted(TASK_QUEUES))
def test_every_task_is_routed_to_its_queue(name: str) -> None:
    expected = keys.BULK_QUEUE if name in (BATCH_START_TASK, BATCH_CHUNK_TASK) else keys.FLOWS_QUEUE
    route = app.amqp.router.route({}, name)
    assert route["queue"].name == TASK_QUEUES[name] == expected


def test_every_action_is_a_subcommand_with_an_option_per_input() -> None:
    assert set(action.commands) == {name.replace("_", "-") for name in ACTIONS}
    for spec in ACTIONS.values():
        command = action.commands[spec.name.replace("_", "-")]
        options = {parameter.name for parameter in command.params}
        assert options == spec.inputs
        assert spec.inputs <= set(INPUT_HELP)


def test_writes_name_their_outcomes_and_their_change() -> None:
    for spec in ACTIONS.values():
        assert spec.writes == bool(spec.change)
        if spec.writes:
            assert spec.outputs == ("success", "outcome")
            assert set(re.findall(r"{(\w+)}", spec.change)) <= spec.inputs


def test_readme_names_every_action_with_its_outputs() -> None:
    sentence = OUTPUTS_SENTENCE.search(_readme())
    assert sentence is not None, "README lost its sentence on action outputs"
    listed = {
        match["name"]: _words(match["outputs"])
        for match in ACTION_OUTPUTS.finditer(sentence["list"])
    }

    assert list(listed) == list(ACTIONS)
    for spec in ACTIONS.values():
        # A write's outputs are followed by its outcomes: `success` and `outcome` (`added` or ...).
        assert listed[spec.name] == [*spec.outputs, *spec.outcomes]


def test_readme_names_the_task_of_every_action() -> None:
    sentence = STEP_TASKS_SENTENCE.search(_readme())
    assert sentence is not None, "README lost its list of step tasks"

    assert _words(sentence["list"]) == [spec.task_name for spec in ACTIONS.values()]
