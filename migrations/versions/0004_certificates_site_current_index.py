"""an index on certificates (site_id, current): a site's current certificate found by its site

Without it SQLite, which keeps no statistics unless ANALYZE runs, joins a site to its current
certificate through an index on ``current`` alone and scans every current certificate for each
site: ``domains list`` of 3,000 sites took 7 s.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_certificates_site_id_current", "certificates", ["site_id", "current"])


def downgrade() -> None:
    op.drop_index("ix_certificates_site_id_current", table_name="certificates")
