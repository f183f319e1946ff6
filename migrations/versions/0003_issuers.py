"""issuers: the issuer of each order and certificate, fallback reason, per-issuer accounts

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("issuer", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("eab_kid", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("eab_hmac_envelope", sa.Text(), nullable=True))

    with op.batch_alter_table("orders", schema=None) as batch_op:
        batch_op.add_column(sa.Column("issuer", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("fallback_reason", sa.Text(), nullable=True))

    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.add_column(sa.Column("issuer", sa.String(length=64), nullable=True))

    with op.batch_alter_table("sites", schema=None) as batch_op:
        batch_op.add_column(sa.Column("preferred_issuer", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sites", schema=None) as batch_op:
        batch_op.drop_column("preferred_issuer")

    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.drop_column("issuer")

    with op.batch_alter_table("orders", schema=None) as batch_op:
        batch_op.drop_column("fallback_reason")
        batch_op.drop_column("issuer")

    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("eab_hmac_envelope")
        batch_op.drop_column("eab_kid")
        batch_op.drop_column("issuer")
