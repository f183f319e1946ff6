"""why a step waits and why ARI was or was not used: what `certman domains show` tells

orders: the limiter bucket a step waits on, until when, and why (our limiter, or the CA's
rateLimited), set when the limiter defers the step and cleared when it proceeds.
certificates: what the last ARI refresh made of the CA's answer (its window used, past, ignored
and why, no ARI at the CA, an error) and the CA's window as it was offered when not used.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("orders", schema=None) as batch_op:
        batch_op.add_column(sa.Column("waiting_bucket", sa.String(length=300), nullable=True))
        batch_op.add_column(sa.Column("waiting_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("waiting_reason", sa.Text(), nullable=True))

    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ari_status", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("ari_detail", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.drop_column("ari_detail")
        batch_op.drop_column("ari_status")

    with op.batch_alter_table("orders", schema=None) as batch_op:
        batch_op.drop_column("waiting_reason")
        batch_op.drop_column("waiting_until")
        batch_op.drop_column("waiting_bucket")
