"""Index for GET /v1/audits: a tenant's audits newest first, (tenant_id, created_at, id).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_audits_tenant_created", "audits", ["tenant_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_audits_tenant_created", table_name="audits")
