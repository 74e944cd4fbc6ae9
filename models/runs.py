"""Flow runs and step runs: what was asked, what each Entra action did, and when."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, UniqueConstraint
from sqlmodel import Field, SQLModel

from models.db import Timestamp, utcnow


def new_run_id() -> str:
    return str(uuid.uuid4())


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class StepStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    # Waiting on the queue for a countdown after a transient Graph error.
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    SKIPPED = "skipped"
    FAILED = "failed"


FINAL_STEP_STATUSES = frozenset({StepStatus.SUCCEEDED, StepStatus.SKIPPED, StepStatus.FAILED})
# A run in one of these is over: nothing of it runs again unless replayed.
FINAL_RUN_STATUSES = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED})


class FlowRun(SQLModel, table=True):
    """One run of a flow, triggered by one event (or by hand)."""

    __tablename__ = "flow_run"

    id: str = Field(default_factory=new_run_id, primary_key=True)
    flow: str = Field(index=True)
    status: RunStatus = Field(default=RunStatus.QUEUED, index=True)
    event_id: str | None = Field(default=None, index=True)
    event_source: str | None = None
    event: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    error: str | None = None
    created_at: datetime = Field(default_factory=utcnow, index=True, sa_type=Timestamp)
    # Set once the chain is on the queue: a run committed but never enqueued has none.
    enqueued_at: datetime | None = Field(default=None, sa_type=Timestamp)
    started_at: datetime | None = Field(default=None, sa_type=Timestamp)
    finished_at: datetime | None = Field(default=None, sa_type=Timestamp)


class StepRun(SQLModel, table=True):
    """One step of a flow run: exactly one Entra action."""

    __tablename__ = "step_run"
    __table_args__ = (UniqueConstraint("run_id", "step_id"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(foreign_key="flow_run.id", index=True)
    position: int
    step_id: str
    action: str
    # The step's `with` templates and `if` condition, as the flow defined them.
    templates: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    condition: str | None = None
    status: StepStatus = Field(default=StepStatus.QUEUED)
    # Deliveries that started executing the step, retries and redeliveries included.
    attempts: int = 0
    inputs: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    output: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    error: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    graph_request_id: str | None = None
    started_at: datetime | None = Field(default=None, sa_type=Timestamp)
    finished_at: datetime | None = Field(default=None, sa_type=Timestamp)
