"""The store's schema. Changed only by an Alembic migration (see migrations/)."""

from pipeline.models.account import Account
from pipeline.models.attempt import Attempt
from pipeline.models.base import Base
from pipeline.models.certificate import Certificate
from pipeline.models.order import Order, OrderKind, OrderStep
from pipeline.models.site import Site, SiteName, SiteState
from pipeline.models.webhook import (
    DeliveryStatus,
    WebhookDelivery,
    WebhookEvent,
    WebhookSubscription,
)

__all__ = [
    "Account",
    "Attempt",
    "Base",
    "Certificate",
    "DeliveryStatus",
    "Order",
    "OrderKind",
    "OrderStep",
    "Site",
    "SiteName",
    "SiteState",
    "WebhookDelivery",
    "WebhookEvent",
    "WebhookSubscription",
]
