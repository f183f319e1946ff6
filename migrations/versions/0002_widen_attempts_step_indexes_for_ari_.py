"""widen attempts.step; indexes for ARI refresh and failure alerts

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.alter_column(
            "step",
            existing_type=sa.VARCHAR(length=16),
            type_=sa.String(length=32),
            existing_nullable=False,
        )

    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.create_index(
            "ix_certificates_current_ari_checked_at", ["current", "ari_checked_at"], unique=False
        )

    with op.batch_alter_table("sites", schema=None) as batch_op:
        batch_op.create_index(
            "ix_sites_consecutive_failures", ["consecutive_failures"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("sites", schema=None) as batch_op:
        batch_op.drop_index("ix_sites_consecutive_failures")

    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.drop_index("ix_certificates_current_ari_checked_at")

    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.alter_column(
            "step",
            existing_type=sa.String(length=32),
            type_=sa.VARCHAR(length=16),
            existing_nullable=False,
        )
