"""Alembic's environment: migrate the connection `models.migrations` hands over."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

from models import audit, batches, connections, flows, runs  # noqa: F401  (the tables autogenerate compares)

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    # SQLite alters a table by copying it: autogenerate must write such changes in batch mode.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
