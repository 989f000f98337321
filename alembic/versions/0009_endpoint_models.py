"""Endpoint models: a model audited through its inference endpoint (docs/models.md,
"Endpoint models") keeps where it answers and its limits (`endpoint`, JSON) and its auth
secret, encrypted (`endpoint_secret`); both null for uploaded models.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("endpoint", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("endpoint_secret", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("endpoint_secret")
        batch.drop_column("endpoint")
