"""Worker heartbeats say whether the worker can sandbox uploaded models (bubblewrap works), so
that /readyz and admissions can tell a deployment where no worker can.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("worker_heartbeats") as batch:
        batch.add_column(sa.Column("sandbox", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("sandbox_problem", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("worker_heartbeats") as batch:
        batch.drop_column("sandbox_problem")
        batch.drop_column("sandbox")
