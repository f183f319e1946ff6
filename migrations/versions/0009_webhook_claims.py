"""webhook claims and a subscription's backoff

webhook_deliveries.claim: the token of the task that holds a delivery's claim (only it sends).
webhook_subscriptions.consecutive_failures, paused_until: a receiver failing again and again is
backed off as a whole.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("webhook_deliveries", sa.Column("claim", sa.String(length=32), nullable=True))
    with op.batch_alter_table("webhook_subscriptions") as batch:
        # The default fills the rows already there; the model sets the value on insert.
        batch.add_column(
            sa.Column(
                "consecutive_failures", sa.Integer(), nullable=False, server_default=sa.text("0")
            )
        )
        batch.add_column(sa.Column("paused_until", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("webhook_subscriptions") as batch:
        batch.alter_column("consecutive_failures", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("webhook_subscriptions") as batch:
        batch.drop_column("paused_until")
        batch.drop_column("consecutive_failures")
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_column("claim")
