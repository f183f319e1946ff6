"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("directory_url", sa.String(length=2048), nullable=False),
        sa.Column("key_envelope", sa.Text(), nullable=False),
        sa.Column("registration_json", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("CURRENT_TIMESTAMP"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("directory_url", name=op.f("uq_accounts_directory_url")),
    )
    op.create_table(
        "sites",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("domain", sa.String(length=253), nullable=False),
        sa.Column("upstream", sa.String(length=2048), nullable=True),
        sa.Column("customer_ref", sa.String(length=255), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("key_type", sa.String(length=16), nullable=True),
        sa.Column("profile", sa.String(length=64), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("CURRENT_TIMESTAMP"),
            nullable=False,
        ),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sites")),
        sa.UniqueConstraint("domain", name=op.f("uq_sites_domain")),
    )
    with op.batch_alter_table("sites", schema=None) as batch_op:
        batch_op.create_index(
            "ix_sites_state_next_attempt_at", ["state", "next_attempt_at"], unique=False
        )

    op.create_table(
        "orders",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("step", sa.String(length=16), nullable=False),
        sa.Column("names", sa.JSON(), nullable=False),
        sa.Column("order_url", sa.String(length=2048), nullable=True),
        sa.Column("finalize_url", sa.String(length=2048), nullable=True),
        sa.Column("certificate_url", sa.String(length=2048), nullable=True),
        sa.Column("authorizations", sa.JSON(), nullable=True),
        sa.Column("replaces", sa.String(length=255), nullable=True),
        sa.Column("exempt", sa.Boolean(), nullable=False),
        sa.Column("profile", sa.String(length=64), nullable=True),
        sa.Column("key_envelope", sa.Text(), nullable=True),
        sa.Column("csr_pem", sa.Text(), nullable=True),
        sa.Column("chain_pem", sa.Text(), nullable=True),
        sa.Column("step_tries", sa.Integer(), nullable=False),
        sa.Column("polls", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("CURRENT_TIMESTAMP"),
            nullable=False,
        ),
        sa.Column("step_changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("touched_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["site_id"], ["sites.id"], name=op.f("fk_orders_site_id_sites"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_orders")),
    )
    with op.batch_alter_table("orders", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_orders_site_id"), ["site_id"], unique=False)
        batch_op.create_index("ix_orders_step_touched_at", ["step", "touched_at"], unique=False)

    op.create_table(
        "site_names",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=253), nullable=False),
        sa.ForeignKeyConstraint(
            ["site_id"], ["sites.id"], name=op.f("fk_site_names_site_id_sites"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_site_names")),
        sa.UniqueConstraint("name", name=op.f("uq_site_names_name")),
    )
    with op.batch_alter_table("site_names", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_site_names_site_id"), ["site_id"], unique=False)

    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("order_id", sa.Integer(), nullable=True),
        sa.Column("step", sa.String(length=16), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("error_type", sa.String(length=128), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("CURRENT_TIMESTAMP"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
            name=op.f("fk_attempts_order_id_orders"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["site_id"], ["sites.id"], name=op.f("fk_attempts_site_id_sites"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_attempts")),
    )
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.create_index(
            "ix_attempts_created_at_outcome", ["created_at", "outcome"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_attempts_site_id"), ["site_id"], unique=False)

    op.create_table(
        "certificates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("order_id", sa.Integer(), nullable=True),
        sa.Column("chain_pem", sa.Text(), nullable=False),
        sa.Column("key_envelope", sa.Text(), nullable=False),
        sa.Column("scheme", sa.String(length=32), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("ari_id", sa.String(length=255), nullable=True),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("renew_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ari_checked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ari_window_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ari_window_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("current", sa.Boolean(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("CURRENT_TIMESTAMP"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
            name=op.f("fk_certificates_order_id_orders"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["site_id"],
            ["sites.id"],
            name=op.f("fk_certificates_site_id_sites"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_certificates")),
        sa.UniqueConstraint("order_id", name=op.f("uq_certificates_order_id")),
    )
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.create_index(
            "ix_certificates_current_not_after", ["current", "not_after"], unique=False
        )
        batch_op.create_index(
            "ix_certificates_current_renew_at", ["current", "renew_at"], unique=False
        )
        batch_op.create_index("ix_certificates_scheme_key_id", ["scheme", "key_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_certificates_site_id"), ["site_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_certificates_site_id"))
        batch_op.drop_index("ix_certificates_scheme_key_id")
        batch_op.drop_index("ix_certificates_current_renew_at")
        batch_op.drop_index("ix_certificates_current_not_after")

    op.drop_table("certificates")
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_attempts_site_id"))
        batch_op.drop_index("ix_attempts_created_at_outcome")

    op.drop_table("attempts")
    with op.batch_alter_table("site_names", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_site_names_site_id"))

    op.drop_table("site_names")
    with op.batch_alter_table("orders", schema=None) as batch_op:
        batch_op.drop_index("ix_orders_step_touched_at")
        batch_op.drop_index(batch_op.f("ix_orders_site_id"))

    op.drop_table("orders")
    with op.batch_alter_table("sites", schema=None) as batch_op:
        batch_op.drop_index("ix_sites_state_next_attempt_at")

    op.drop_table("sites")
    op.drop_table("accounts")
