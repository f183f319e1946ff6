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

The same detached connection is met once more after the reconnection, by a task that was running
in a pool process when Redis went away and finishes on the new connection: its acknowledgement
(late, ``task_acks_late``) goes to the message's own channel, which belonged to the lost
connection, and kombu's Redis channel makes its pool from the detached client again; Celery's
``ack_log_error`` forgives only the broker's connection errors, so the ``AttributeError`` ends
the worker from its event loop (seen in Sentinel failovers). Such an acknowledgement (or
rejection) is let go in one line instead: the message is still in Redis's unacked set and comes
back after the visibility timeout, and every task is idempotent, so the copy finds its work done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer.gossip import Gossip as CeleryGossip

__all__ = ["Consumer", "Gossip", "lost_with_its_connection"]

log = logging.getLogger(__name__)


GOSSIP = "celery.worker.consumer.gossip:Gossip"

# How long a task event (received, started, succeeded, retried: what Flower lists) may wait in
# Celery's buffer, so that one message to Redis carries every event of that stretch.
TASK_EVENT_FLUSH_INTERVAL = 0.1


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


def lost_with_its_connection(message: Any) -> bool:
    """Whether ``message`` came on a connection the consumer has since let go of: kombu's
    ``Connection.collect()`` detached its transport (``client = None``) or closed its channel.
    """
    channel = getattr(message, "channel", None)
    transport = getattr(channel, "connection", None)
    return channel is None or transport is None or getattr(transport, "client", None) is None


def _settle(settle: Callable[..., Any]) -> Callable[..., Any]:
    """``settle`` (a message's ``ack_log_error`` or ``reject_log_error``), let go with a line in
    the log when it fails because the message's connection is gone (see the module's docstring).

    It is still tried: over a plain Redis the lost channel keeps its connection pool, which
    reaches the restarted server, and the acknowledgement goes through. Over Sentinel the pool
    is made by asking the Sentinels for the master, which fails while none is known, so the
    channel is left without one and the next use makes it from the detached client."""
    message = getattr(settle, "__self__", None)
    if message is None:
        return settle

    def settle_unless_lost(*args: Any, **kwargs: Any) -> Any:
        try:
            return settle(*args, **kwargs)
        except AttributeError as error:
            if not lost_with_its_connection(message):
                raise
            log.warning(
                "consumer: task message %s came on the broker connection lost since and cannot "
                "be settled there (%s); it stays unacknowledged in Redis and comes back after the "
                "visibility timeout",
                getattr(message, "delivery_tag", "?"),
                error,
            )
            return None

    return settle_unless_lost


class Consumer(CeleryConsumer):  # type: ignore[misc]  # celery ships no type hints
    """``worker_consumer = "pipeline.consumer:Consumer"``."""

    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[misc]
        default_steps = [
            "pipeline.consumer:Gossip" if step == GOSSIP else step
            for step in CeleryConsumer.Blueprint.default_steps
        ]

    # When the flush this consumer asked its event loop for is due (monotonic), if any.
    _event_flush_due: float | None = None

    def on_send_event_buffered(self) -> None:
        """A task event went into the event dispatcher's buffer: flush it soon, not at once.

        Celery flushes on the event loop's next turn, which under load is one PUBLISH to Redis
        for nearly every event (about three a task): 7 % of the worker processes' samples (py-spy,
        ``benchmarks/issuance.py --profile``, 1,000 sites). Here the buffer is flushed at most
        once per :data:`TASK_EVENT_FLUSH_INTERVAL`: the same events, in the same order, in
        Celery's own batch message (``task.multi``, which Flower and ``celery events`` read),
        up to that much later. Celery still flushes at once when the buffer is full.
        """
        if not self.hub:
            super().on_send_event_buffered()
            return
        now = time.monotonic()
        due = self._event_flush_due
        # A flush long overdue was lost with the loop's timers (a reconnection resets them):
        # ask again rather than leave the events to wait for a full buffer.
        if due is not None and now < due + TASK_EVENT_FLUSH_INTERVAL:
            return
        self._event_flush_due = now + TASK_EVENT_FLUSH_INTERVAL
        self.hub.call_later(TASK_EVENT_FLUSH_INTERVAL, self._flush_buffered_events)

    def _flush_buffered_events(self) -> None:
        self._event_flush_due = None
        self._flush_events()

    def shutdown(self) -> None:
        # The events still buffered (at most one interval's) go out before the connection
        # closes: Flower would otherwise show the last tasks as still running.
        try:
            self._flush_events()
        except Exception as exc:  # the broker away: they are lost, as Celery's would be
            log.debug("consumer: could not flush the last task events: %s", exc)
        super().shutdown()

    def call_soon_ack(self, p: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # Celery queues every acknowledgement and rejection of a task message through here
        # (its ack and reject promises), to run in the worker's event loop.
        return super().call_soon_ack(_settle(p), *args, **kwargs)

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
