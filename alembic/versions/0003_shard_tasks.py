"""Shards as tasks: audit_shards become planned, leased rows; audits get queue, priority and
shard counts.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UTC_DATETIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("audits") as batch:
        batch.add_column(
            sa.Column("queue", sa.String(32), nullable=False, server_default="tightrope.cpu")
        )
        batch.add_column(
            sa.Column("priority", sa.String(8), nullable=False, server_default="normal")
        )
        batch.add_column(sa.Column("shards_total", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("shards_done", sa.Integer, nullable=False, server_default="0"))
    with op.batch_alter_table("audit_shards") as batch:
        # Rows written before this revision are finished results.
        batch.add_column(sa.Column("status", sa.String(16), nullable=False, server_default="done"))
        batch.add_column(
            sa.Column("queue", sa.String(32), nullable=False, server_default="tightrope.cpu")
        )
        batch.add_column(sa.Column("position", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("check_index", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("kind", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("subject", sa.String(32), nullable=False, server_default="model"))
        batch.alter_column("result", existing_type=sa.JSON, nullable=True)
        batch.add_column(sa.Column("lease_owner", sa.String(200), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", UTC_DATETIME, nullable=True))
        batch.add_column(sa.Column("heartbeat_at", UTC_DATETIME, nullable=True))
        batch.add_column(sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("enqueued_at", UTC_DATETIME, nullable=True))
        batch.add_column(sa.Column("worker", sa.String(200), nullable=True))
        batch.add_column(sa.Column("started_at", UTC_DATETIME, nullable=True))
        batch.add_column(sa.Column("finished_at", UTC_DATETIME, nullable=True))
    op.create_index(
        "ix_audit_shards_claim", "audit_shards", ["status", "queue", "audit_id", "position"]
    )


def downgrade() -> None:
    op.drop_index("ix_audit_shards_claim", table_name="audit_shards")
    op.execute("DELETE FROM audit_shards WHERE status != 'done'")
    with op.batch_alter_table("audit_shards") as batch:
        for name in (
            "finished_at", "started_at", "worker", "enqueued_at", "attempts", "heartbeat_at",
            "lease_expires_at", "lease_owner", "subject", "kind", "check_index", "position",
            "queue", "status",
        ):
            batch.drop_column(name)
        batch.alter_column("result", existing_type=sa.JSON, nullable=False)
    with op.batch_alter_table("audits") as batch:
        for name in ("shards_done", "shards_total", "priority", "queue"):
            batch.drop_column(name)
