"""A site's history: every change (add, update, remove, renew, revoke) and who made it.

Keyed by the domain, not the site's id: a removal deletes the site, and its history stays.
"""

from __future__ import annotations

from sqlalchemy import Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from pipeline.models.base import Base, created_at, intpk


class SiteChange(Base):
    __tablename__ = "site_changes"

    id: Mapped[intpk]
    domain: Mapped[str] = mapped_column(String(253))
    action: Mapped[str] = mapped_column(String(16))  # add, update, remove, renew, revoke
    # Who: an API token's name (``api:<name>``) or ``cli:<unix user>``.
    actor: Mapped[str] = mapped_column(String(128))
    detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[created_at]

    __table_args__ = (Index("ix_site_changes_domain_id", "domain", "id"),)
