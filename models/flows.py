"""Stored flow definitions and the events already turned into runs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, UniqueConstraint
from sqlmodel import Field, SQLModel

from models.db import Timestamp
from models.runs import utcnow


class Flow(SQLModel, table=True):
    """One flow as `flows apply` stored it: its validated definition and whether it is enabled."""

    __tablename__ = "flow"

    name: str = Field(primary_key=True)
    trigger_type: str = Field(index=True)
    # The flow as a JSON object: {"name", "trigger": {"type", "if"}, "steps": [...]}.
    definition: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    source: str | None = None
    enabled: bool = True
    version: int = 1
    created_at: datetime = Field(default_factory=utcnow, sa_type=Timestamp)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=Timestamp)


class AcceptedEvent(SQLModel, table=True):
    """An event the scheduler turned into runs; its (source, id) makes a duplicate recognisable."""

    __tablename__ = "accepted_event"
    __table_args__ = (UniqueConstraint("source", "event_id"),)

    id: int | None = Field(default=None, primary_key=True)
    source: str
    event_id: str
    event_type: str
    stream_id: str | None = None
    run_ids: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    accepted_at: datetime = Field(default_factory=utcnow, index=True, sa_type=Timestamp)
