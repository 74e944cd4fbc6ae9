"""Flow definitions: the YAML a person writes, validated, stored, and matched against events."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, col, select

from models.flows import Flow


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


def enabled_flows_for(session: Session, event_type: str) -> list[FlowDefinition]:
    """The enabled flows whose trigger is `event_type`, in name order."""
    rows = session.exec(
        select(Flow)
        .where(Flow.trigger_type == event_type)
        .where(col(Flow.enabled).is_(True))
        .order_by(col(Flow.name))
    ).all()
    return [FlowDefinition.model_validate(row.definition) for row in rows]
