"""sites.version: a counter of the changes an operator makes (API PUT, certman domains update)

The API's ETag includes it and a PUT or DELETE changes a site only where it is still the
version the caller saw (UPDATE ... WHERE version = ?): a lost update is refused on SQLite too,
where SELECT ... FOR UPDATE is ignored. The workers' state changes do not move it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sites") as batch:
        batch.add_column(sa.Column("version", sa.Integer(), server_default="1", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("sites") as batch:
        batch.drop_column("version")
