"""Flow definitions: the YAML a person writes, validated, stored, and matched against events.

`apply_flows` checks every file before it stores anything, and reports every problem it finds,
each naming its file and step: a folder with one bad file changes nothing stored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails
from sqlmodel import Session, col, select

from entraflow.catalogue import ACTIONS
from entraflow.settings import Settings
from entraflow.templating import (
    STEPS_NAME,
    TemplateProblem,
    TemplateReads,
    condition_reads,
    template_reads,
)
from models.db import session_scope
from models.flows import Flow
from models.runs import utcnow

FLOW_FILE_SUFFIXES = (".yaml", ".yml")
# A flow name is typed on command lines and shown in Flower: no spaces, no leading `-` or `.`.
FLOW_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# A step id is read in templates as `steps.<id>`, so it must be a template identifier.
STEP_ID_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
EVENT_NAME = "event"
STEP_NAMES = frozenset({EVENT_NAME, STEPS_NAME})


class StepDefinition(BaseModel):
    """One step: exactly one Entra action with templated inputs and an optional condition."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: str
    action: str
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    if_: str | None = Field(default=None, alias="if")


class TriggerDefinition(BaseModel):
    """Which events start the flow: a CloudEvents type and an optional condition."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: str
    if_: str | None = Field(default=None, alias="if")


class FlowDefinition(BaseModel):
    """A whole flow as its YAML file defines it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    trigger: TriggerDefinition
    steps: list[StepDefinition]

    def step_dicts(self) -> list[dict[str, Any]]:
        """The steps as `scheduler.runs` records them: `id`, `action`, `with`, `if`."""
        return [step.model_dump(by_alias=True) for step in self.steps]


class FlowFileError(ValueError):
    """Raised when flow files have problems; `problems` holds every one, each naming its file."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class FlowNotFoundError(LookupError):
    """Raised when no stored flow has the name asked for."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no flow named {name!r}; `entraflow flows list` shows the stored flows")
        self.name = name


class ApplyOutcome(StrEnum):
    """What `apply_flows` did with one flow."""

    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class ApplyResult:
    """One applied flow: its name, what happened to it, and its stored version."""

    name: str
    outcome: ApplyOutcome
    version: int


@dataclass(frozen=True)
class _LoadedFlow:
    definition: FlowDefinition
    source: Path


def enabled_flows_for(session: Session, event_type: str) -> list[FlowDefinition]:
    """The enabled flows whose trigger is `event_type`, in name order."""
    rows = session.exec(
        select(Flow)
        .where(Flow.trigger_type == event_type)
        .where(col(Flow.enabled).is_(True))
        .order_by(col(Flow.name))
    ).all()
    return [FlowDefinition.model_validate(row.definition) for row in rows]


def load_flows(path: Path) -> list[FlowDefinition]:
    """The flows of a `.yaml`/`.yml` file or a folder of them; raises `FlowFileError`."""
    return [loaded.definition for loaded in _load_checked(path)]


def apply_flows(settings: Settings, path: Path) -> list[ApplyResult]:
    """Check the flows at `path`, then store them all in one transaction; raises `FlowFileError`."""
    loaded = _load_checked(path)
    with session_scope(settings.resolved_database_url) as session:
        return [_store(session, flow) for flow in loaded]


def list_flows(settings: Settings) -> list[dict[str, Any]]:
    """Every stored flow, in name order, as a JSON-ready summary."""
    with session_scope(settings.resolved_database_url) as session:
        rows = session.exec(select(Flow).order_by(col(Flow.name))).all()
        return [
            {
                "name": row.name,
                "trigger": row.trigger_type,
                "enabled": row.enabled,
                "steps": len(row.definition.get("steps", [])),
                "version": row.version,
                "source": row.source,
                "updated_at": row.updated_at,
            }
            for row in rows
        ]


def set_enabled(settings: Settings, name: str, enabled: bool) -> None:
    """Enable or disable the stored flow `name`; raises `FlowNotFoundError`."""
    with session_scope(settings.resolved_database_url) as session:
        row = session.get(Flow, name)
        if row is None:
            raise FlowNotFoundError(name)
        row.enabled = enabled
        session.add(row)


def get_flow(settings: Settings, name: str) -> FlowDefinition:
    """The stored flow `name`; raises `FlowNotFoundError`."""
    with session_scope(settings.resolved_database_url) as session:
        row = session.get(Flow, name)
        if row is None:
            raise FlowNotFoundError(name)
        return FlowDefinition.model_validate(row.definition)


def _store(session: Session, loaded: _LoadedFlow) -> ApplyResult:
    flow = loaded.definition
    definition = flow.model_dump(by_alias=True)
    source = str(loaded.source.resolve())
    row = session.get(Flow, flow.name)
    if row is None:
        session.add(
            Flow(
                name=flow.name,
                trigger_type=flow.trigger.type,
                definition=definition,
                source=source,
            )
        )
        return ApplyResult(flow.name, ApplyOutcome.CREATED, version=1)
    if row.definition == definition:
        # The same flow from another file: note where it now comes from, as no new version.
        if row.source != source:
            row.source = source
            session.add(row)
        return ApplyResult(flow.name, ApplyOutcome.UNCHANGED, version=row.version)
    row.definition = definition
    row.trigger_type = flow.trigger.type
    row.source = source
    row.updated_at = utcnow()
    row.version += 1
    session.add(row)
    return ApplyResult(flow.name, ApplyOutcome.UPDATED, version=row.version)


def _load_checked(path: Path) -> list[_LoadedFlow]:
    files, problems = _flow_files(path)
    loaded: list[_LoadedFlow] = []
    for file in files:
        definition, file_problems = _load_file(file)
        problems.extend(file_problems)
        if definition is not None:
            loaded.append(_LoadedFlow(definition, file))
    problems.extend(_duplicate_names(loaded))
    if problems:
        raise FlowFileError(problems)
    return loaded


def _flow_files(path: Path) -> tuple[list[Path], list[str]]:
    suffixes = " or ".join(FLOW_FILE_SUFFIXES)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in FLOW_FILE_SUFFIXES and p.is_file())
        return files, [] if files else [f"{path}: no {suffixes} files in this folder"]
    if not path.exists():
        return [], [f"{path}: no such file or folder"]
    if path.suffix not in FLOW_FILE_SUFFIXES:
        return [], [f"{path}: not a {suffixes} file"]
    return [path], []


def _load_file(file: Path) -> tuple[FlowDefinition | None, list[str]]:
    try:
        document = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        return None, [f"{file}: cannot read the file: {exc}"]
    except yaml.YAMLError as exc:
        return None, [f"{file}: {_yaml_problem(exc)}"]
    if document is None:
        return None, [f"{file}: the file is empty"]
    if not isinstance(document, dict):
        kind = type(document).__name__
        return None, [f"{file}: a flow file holds a mapping (name, trigger, steps), not a {kind}"]
    try:
        flow = FlowDefinition.model_validate(document)
    except ValidationError as exc:
        return None, [f"{file}: {_structure_problem(error, document)}" for error in exc.errors()]
    return flow, [f"{file}: {problem}" for problem in _flow_problems(flow)]


def _yaml_problem(exc: yaml.YAMLError) -> str:
    # PyYAML's own message spans several lines and quotes the source; keep one line.
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"YAML syntax, line {mark.line + 1} column {mark.column + 1}: {exc.problem}"
    return f"YAML syntax: {exc}"


def _structure_problem(error: ErrorDetails, document: Mapping[str, Any]) -> str:
    location = list(error["loc"])
    where = ""
    if len(location) >= 2 and location[0] == "steps" and isinstance(location[1], int):
        where = f"{_step_label(document, location[1])}: "
        location = location[2:]
    if error["type"] == "extra_forbidden":
        return f"{where}unknown key {'.'.join(map(str, location))!r}"
    if error["type"] == "missing":
        return f"{where}missing key {'.'.join(map(str, location))!r}"
    field = ".".join(map(str, location))
    return f"{where}{field + ': ' if field else ''}{error['msg']}"


def _step_label(document: Mapping[str, Any], index: int) -> str:
    step = document["steps"][index]
    step_id = step.get("id") if isinstance(step, dict) else None
    return f"step {step_id!r}" if isinstance(step_id, str) else f"step {index + 1}"


def _flow_problems(flow: FlowDefinition) -> list[str]:
    problems: list[str] = []
    if not flow.name.strip():
        problems.append("name: must not be empty")
    elif not FLOW_NAME_PATTERN.fullmatch(flow.name):
        problems.append(
            f"name {flow.name!r}: use letters, digits, '-', '_' and '.', "
            "starting with a letter or a digit"
        )
    if not flow.trigger.type.strip():
        problems.append("trigger.type: must not be empty")
    if flow.trigger.if_ is not None:
        problems.extend(f"trigger.if: {problem}" for problem in _trigger_problems(flow.trigger.if_))
    if not flow.steps:
        problems.append("steps: a flow needs at least one step")
    step_ids = [step.id for step in flow.steps]
    for index, step in enumerate(flow.steps):
        earlier, later = step_ids[:index], step_ids[index + 1 :]
        problems.extend(
            f"step {step.id!r}: {problem}" for problem in _step_problems(step, earlier, later)
        )
    return problems


def _step_problems(step: StepDefinition, earlier: list[str], later: list[str]) -> list[str]:
    problems: list[str] = []
    if not STEP_ID_PATTERN.fullmatch(step.id):
        problems.append(
            "the id must be letters, digits and '_', not starting with a digit, "
            "so that templates can read it as steps.<id>"
        )
    if step.id in earlier:
        problems.append("duplicate step id")
    problems.extend(_input_problems(step))
    for name, value in step.with_.items():
        if not isinstance(value, str):
            problems.append(f"with.{name}: must be a string, not {type(value).__name__}")
            continue
        try:
            reads = template_reads(value)
        except TemplateProblem as exc:
            problems.append(f"with.{name}: {exc}")
            continue
        problems.extend(
            f"with.{name}: {problem}" for problem in _read_problems(reads, step.id, earlier, later)
        )
    if step.if_ is not None:
        try:
            reads = condition_reads(step.if_)
        except TemplateProblem as exc:
            return [*problems, f"if: {exc}"]
        problems.extend(
            f"if: {problem}" for problem in _read_problems(reads, step.id, earlier, later)
        )
    return problems


def _input_problems(step: StepDefinition) -> list[str]:
    spec = ACTIONS.get(step.action)
    if spec is None:
        return [f"unknown action {step.action!r}; known: {', '.join(sorted(ACTIONS))}"]
    given = set(step.with_)
    problems = [
        f"unknown input {name!r} for {spec.name}; it takes {', '.join(sorted(spec.inputs))}"
        for name in sorted(given - spec.inputs)
    ]
    problems.extend(
        f"missing input {name!r} for {spec.name}" for name in sorted(spec.required_inputs - given)
    )
    chosen = sorted(given & spec.one_of)
    if spec.one_of and len(chosen) != 1:
        problems.append(
            f"{spec.name} needs exactly one of {', '.join(sorted(spec.one_of))}; "
            f"got {', '.join(chosen) or 'none'}"
        )
    return problems


def _trigger_problems(condition: str) -> list[str]:
    try:
        reads = condition_reads(condition)
    except TemplateProblem as exc:
        return [str(exc)]
    # A trigger is decided before any step has run.
    return [
        f"reads {name!r}; a trigger condition reads only 'event'"
        for name in sorted(reads.names - {EVENT_NAME})
    ]


def _read_problems(
    reads: TemplateReads, step_id: str, earlier: list[str], later: list[str]
) -> list[str]:
    problems = [
        f"unknown name {name!r}; templates read 'event' and 'steps'"
        for name in sorted(reads.names - STEP_NAMES)
    ]
    for read in sorted(reads.step_ids):
        if read in earlier:
            continue
        if read == step_id:
            problems.append(f"reads steps.{read}, its own output")
        elif read in later:
            problems.append(f"reads steps.{read}, a step that runs later")
        else:
            problems.append(f"reads steps.{read}, but the flow has no step {read!r}")
    if reads.computed_step:
        problems.append("reads steps[...] with a computed name; name the step: steps.<id>")
    return problems


def _duplicate_names(loaded: list[_LoadedFlow]) -> list[str]:
    first_source: dict[str, Path] = {}
    problems: list[str] = []
    for flow in loaded:
        name = flow.definition.name
        if name in first_source:
            problems.append(
                f"{flow.source}: flow name {name!r} is also used by {first_source[name]}"
            )
        else:
            first_source[name] = flow.source
    return problems
