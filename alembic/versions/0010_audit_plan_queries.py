"""An endpoint model's audit keeps the query ledger of its plan step (`plan_queries`, JSON):
the probe through the audit's operator queries the endpoint before any shard exists, and the
report's ledger (docs/reports.md, "queries") counts those queries too. Null for other audits.
And `queries_drawn`: how much of the audit's query budget its steps (plan, shards on any
worker, finalising) have drawn, by atomic conditional updates (workers.execution.query_budget).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audits") as batch:
        batch.add_column(sa.Column("plan_queries", sa.JSON(), nullable=True))
        batch.add_column(
            sa.Column("queries_drawn", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("audits") as batch:
        batch.drop_column("queries_drawn")
        batch.drop_column("plan_queries")
