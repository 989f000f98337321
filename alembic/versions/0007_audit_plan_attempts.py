"""Audits keep how many tries their planning step needed: `attempts` is reset when the plan is
stored (it then counts the finalising task's tries), and the API's `attempts` (the most tries
any step needed) must not drop back to 0 meanwhile.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audits") as batch:
        batch.add_column(
            sa.Column("plan_attempts", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("audits") as batch:
        batch.drop_column("plan_attempts")
