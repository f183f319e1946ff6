"""The worker's broker consumer, riding out a Redis restart.

When the broker connection drops, Celery's consumer closes the broken connection and starts a
new one, ignoring the broker's connection and channel errors on the way. With kombu's Redis
transport (kombu 5.7) the close can raise an ``AttributeError`` instead: closing the channel
restores the messages it had delivered and not yet acknowledged (the tasks in hand), which
needs a connection pool; the pool was dropped with the failed connection and is made again from
the transport's client, which ``Connection.collect()`` has just detached (``None``), so
``'NoneType' object has no attribute 'hostname'`` escapes ``ignore_errors`` and ends the worker
(seen only with tasks in hand when Redis went away: a busy worker, the case that matters).

Those messages need no restoring by a close anyway: they are still in Redis's unacked set (or
gone with Redis's data, which beat then recovers from, see :mod:`pipeline.beat`), and the
transport hands them out again after the visibility timeout. So the close failing this way is
logged in one line and the consumer reconnects as it would have.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer.gossip import Gossip as CeleryGossip

__all__ = ["Consumer", "Gossip"]

log = logging.getLogger(__name__)


GOSSIP = "celery.worker.consumer.gossip:Gossip"


class Gossip(CeleryGossip):  # type: ignore[misc]
    """Celery's gossip step (the units run workers with gossip on), stopped quietly after a
    lost connection.

    The consumer lets go of a lost connection (``connection = None``) before it stops and
    restarts its steps; gossip's stop then closes its channel through kombu's
    ``ignore_errors(c.connection, ...)``, which needs that connection to know which errors to
    ignore, and logs ``AttributeError: 'NoneType' object has no attribute
    'connection_errors'`` with a traceback at ERROR on every reconnection.
    """

    def _close(self, c: Any, cancel_consumers: bool = True) -> None:
        if c.connection is not None:
            super()._close(c, cancel_consumers)
            return
        # The channels belonged to the lost connection: closing them can only fail, and there
        # is nothing left to release on a broker that is gone.
        for consumer in self.consumers or []:
            if consumer.channel is not None:
                try:
                    consumer.channel.close()
                except Exception:
                    log.debug("gossip: closing a channel of the lost connection", exc_info=True)


class Consumer(CeleryConsumer):  # type: ignore[misc]  # celery ships no type hints
    """``worker_consumer = "pipeline.consumer:Consumer"``."""

    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[misc]
        default_steps = [
            "pipeline.consumer:Gossip" if step == GOSSIP else step
            for step in CeleryConsumer.Blueprint.default_steps
        ]

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as error:
            # Celery has already let go of the connection (self.connection is None): what
            # follows in the caller is the usual reconnection.
            log.warning(
                "consumer: the lost broker connection could not be closed cleanly (%s); its "
                "unacknowledged tasks come back after the visibility timeout: reconnecting",
                error,
            )
