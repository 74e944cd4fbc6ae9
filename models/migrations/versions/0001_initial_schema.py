"""The initial schema: every table as the models defined it when migrations began.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# The types PostgreSQL creates for the enum columns; dropping a table leaves its types behind.
ENUM_TYPES = (
    "batchstatus",
    "causekind",
    "connectionkind",
    "connectionstatus",
    "itemaction",
    "runstatus",
    "stepstatus",
)
# Children before the tables their foreign keys point at.
TABLES = (
    "step_run",
    "batch_item",
    "flow_run",
    "flow",
    "connection",
    "batch",
    "audit_entry",
    "accepted_event",
)


def upgrade() -> None:
    op.create_table(
        "accepted_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("event_id", sa.String(), nullable=False),
        sa.Column("event_type", sa.String(), nullable=False),
        sa.Column("stream_id", sa.String(), nullable=True),
        sa.Column("run_ids", sa.JSON(), nullable=False),
        sa.Column("accepted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("source", "event_id"),
    )
    op.create_index("ix_accepted_event_accepted_at", "accepted_event", ["accepted_at"])

    op.create_table(
        "audit_entry",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("user_id", sa.String(), nullable=True),
        sa.Column("group_id", sa.String(), nullable=True),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("changed", sa.Boolean(), nullable=False),
        sa.Column("connection_kind", sa.String(), nullable=False),
        sa.Column("connection_app_id", sa.String(), nullable=True),
        sa.Column("connection_tenant_id", sa.String(), nullable=True),
        sa.Column("connection_account", sa.String(), nullable=True),
        sa.Column("cause", sa.Enum("FLOW_RUN", "BATCH", name="causekind"), nullable=False),
        sa.Column("run_id", sa.String(), nullable=True),
        sa.Column("step_id", sa.String(), nullable=True),
        sa.Column("batch_id", sa.String(), nullable=True),
        sa.Column("batch_row", sa.Integer(), nullable=True),
        sa.Column("event_source", sa.String(), nullable=True),
        sa.Column("event_id", sa.String(), nullable=True),
        sa.Column("graph_request_id", sa.String(), nullable=True),
        sa.Column("error_code", sa.String(), nullable=True),
        sa.Column("error_message", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_entry_batch_id", "audit_entry", ["batch_id"])
    op.create_index("ix_audit_entry_group_id", "audit_entry", ["group_id"])
    op.create_index("ix_audit_entry_run_id", "audit_entry", ["run_id"])
    op.create_index("ix_audit_entry_time", "audit_entry", ["time"])
    op.create_index("ix_audit_entry_user_id", "audit_entry", ["user_id"])

    op.create_table(
        "batch",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column(
            "status",
            sa.Enum("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", name="batchstatus"),
            nullable=False,
        ),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("chunks", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_batch_created_at", "batch", ["created_at"])
    op.create_index("ix_batch_status", "batch", ["status"])

    op.create_table(
        "connection",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.Enum("DELEGATED", "APP", name="connectionkind"), nullable=False),
        sa.Column("tenant_id", sa.String(), nullable=False),
        sa.Column("client_id", sa.String(), nullable=False),
        sa.Column("account_upn", sa.String(), nullable=True),
        sa.Column("scopes", sa.String(), nullable=False),
        sa.Column("refresh_token_ciphertext", sa.String(), nullable=True),
        sa.Column("client_secret_ciphertext", sa.String(), nullable=True),
        sa.Column("access_token_ciphertext", sa.String(), nullable=True),
        sa.Column("access_token_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("access_token_refresh_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("connected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "status", sa.Enum("CONNECTED", "BROKEN", name="connectionstatus"), nullable=False
        ),
        sa.Column("broken_reason", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "flow",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("trigger_type", sa.String(), nullable=False),
        sa.Column("definition", sa.JSON(), nullable=False),
        sa.Column("source", sa.String(), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_index("ix_flow_trigger_type", "flow", ["trigger_type"])

    op.create_table(
        "flow_run",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("flow", sa.String(), nullable=False),
        sa.Column(
            "status",
            sa.Enum("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", name="runstatus"),
            nullable=False,
        ),
        sa.Column("event_id", sa.String(), nullable=True),
        sa.Column("event_source", sa.String(), nullable=True),
        sa.Column("event", sa.JSON(), nullable=False),
        sa.Column("error", sa.String(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_flow_run_created_at", "flow_run", ["created_at"])
    op.create_index("ix_flow_run_event_id", "flow_run", ["event_id"])
    op.create_index("ix_flow_run_flow", "flow_run", ["flow"])
    op.create_index("ix_flow_run_status", "flow_run", ["status"])

    op.create_table(
        "batch_item",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.String(), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("action", sa.Enum("ADD", "REMOVE", name="itemaction"), nullable=False),
        sa.Column("user_id", sa.String(), nullable=False),
        sa.Column("group_id", sa.String(), nullable=False),
        sa.Column("chunk", sa.Integer(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(), nullable=True),
        sa.Column("success", sa.Boolean(), nullable=True),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("code", sa.String(), nullable=True),
        sa.Column("message", sa.String(), nullable=True),
        sa.Column("request_id", sa.String(), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["batch.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_batch_item_batch_chunk", "batch_item", ["batch_id", "chunk"])
    op.create_index("ix_batch_item_batch_outcome", "batch_item", ["batch_id", "outcome"])

    op.create_table(
        "step_run",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("step_id", sa.String(), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("templates", sa.JSON(), nullable=False),
        sa.Column("condition", sa.String(), nullable=True),
        sa.Column(
            "status",
            sa.Enum(
                "QUEUED", "RUNNING", "RETRYING", "SUCCEEDED", "SKIPPED", "FAILED", name="stepstatus"
            ),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("inputs", sa.JSON(), nullable=True),
        sa.Column("output", sa.JSON(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("graph_request_id", sa.String(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["flow_run.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "step_id"),
    )
    op.create_index("ix_step_run_run_id", "step_run", ["run_id"])


def downgrade() -> None:
    for table in TABLES:
        op.drop_table(table)
    bind = op.get_bind()
    for name in ENUM_TYPES:
        sa.Enum(name=name).drop(bind, checkfirst=True)
