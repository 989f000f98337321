"""Indexes for the filters of GET /v1/audits: a tenant's audits of one status, or of one model,
newest first, so that every page of a filtered list is one index range scan.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_audits_tenant_status_created", "audits", ["tenant_id", "status", "created_at", "id"]
    )
    op.create_index(
        "ix_audits_tenant_model_created", "audits", ["tenant_id", "model_id", "created_at", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_audits_tenant_model_created", table_name="audits")
    op.drop_index("ix_audits_tenant_status_created", table_name="audits")
