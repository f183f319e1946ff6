"""Least privilege in Redis: the ACL rules of certman's two Redis users.

Signed distribution already makes a Redis writer unable to steer, impersonate or answer
challenges; the ACL keeps the edges, the hosts nearest to the internet, from being Redis
writers at all, and keeps both users inside certman's keys on a Redis shared with others.

- the **edge** user reads certman's keys (``GET``, ``MGET``, ``HGET``, ``HMGET``, ``HGETALL``,
  ``HLEN``, ``EXISTS``, ``MULTI``/``EXEC`` around the snapshot read) and subscribes to its
  channel; nothing else, and no write of any kind.
- the **pipeline** user (workers, beat, Flower, the ``certman`` commands) reads and writes
  certman's keys and the Celery broker's (kombu's Redis transport: the queues, their priority
  lists, ``_kombu.*``, ``unacked*``, the remote-control (pidbox) queues) and publishes on
  certman's channel and Celery's event and remote-control fan-out channels (including the
  workers' gossip, so the units need no ``--without-gossip``). It gets no admin
  or dangerous commands (``FLUSHALL``, ``CONFIG``, ``KEYS``, ``DEBUG``...).

:func:`setuser_commands` renders them as ``ACL SETUSER`` lines (docs/production.md shows them
for the default prefix; the integration tests apply them to their redis-server).
"""

from __future__ import annotations

__all__ = ["CELERY_QUEUES", "edge_rules", "pipeline_rules", "setuser_commands"]

CELERY_QUEUES = ("issuance", "renewals", "maintenance")

# Every command an edge sends (edge/sync.py, edge/app.py, edge/challenges.py), plus what
# redis-py sends on connecting (SELECT for a database other than 0) and for health checks
# (PING, also inside a subscription). redis-py's CLIENT SETINFO on connecting is refused and
# ignored (Redis 7.2+ logs the refusal in ACL LOG; add +client|setinfo there to quiet it).
_EDGE_COMMANDS = (
    "ping", "get", "mget", "hget", "hmget", "hgetall", "hlen", "exists", "multi", "exec",
    "discard", "subscribe", "unsubscribe", "select",
)  # fmt: skip


def edge_rules(prefix: str = "certman") -> list[str]:
    """Read-only on ``prefix:*`` (``%R~``: read access to the keys), subscribe on its channel."""
    return [
        "resetkeys", "resetchannels", f"%R~{prefix}:*", f"&{prefix}:events", "-@all",
        *(f"+{command}" for command in _EDGE_COMMANDS),
    ]  # fmt: skip


def pipeline_rules(
    prefix: str = "certman", db: int = 0, queues: tuple[str, ...] = CELERY_QUEUES
) -> list[str]:
    """Read-write on certman's keys and the broker's; no admin or dangerous commands.

    ``db`` is the database number of ``CERTMAN_REDIS_URL``: kombu's fan-out channels carry it.
    """
    broker_keys = [
        # A queue is a list named after it, priority levels are lists named queue + \x06\x16 +
        # level (hence the *); "celery" is the default queue and the pidbox exchange.
        *(f"~{queue}*" for queue in (*queues, "celery")),
        "~_kombu.*",  # exchange -> queue bindings (and their sweeping bookkeeping)
        "~unacked*",  # unacked, unacked_index, unacked_mutex: the visibility timeout's records
        # Remote control: each worker's <node name>.celery.pidbox queue, and the
        # <id>.reply.celery.pidbox queues answers come back on (Flower, celery inspect).
        "~*.celery.pidbox*",
    ]
    channels = [
        f"&{prefix}:events",
        # kombu's fan-out exchanges are channels /<db>.<exchange>[/<routing key>], a routing
        # key's # written * (kombu.transport.redis). kombu PSUBSCRIBEs to these patterns, and
        # Redis lets a user PSUBSCRIBE only to a pattern written in its ACL character for
        # character, so each subscriber's pattern is listed; PUBLISH to any matching channel.
        f"&/{db}.celeryev/*",  # every event: Flower, `celery events` (routing key #)
        f"&/{db}.celeryev/worker.*",  # the workers' gossip (routing key worker.#)
        f"&/{db}.celery.pidbox",  # remote control broadcast (celery inspect/control, mingle)
    ]
    return [
        "resetkeys", "resetchannels", f"~{prefix}:*", *broker_keys, *channels,
        # @dangerous covers FLUSHALL, FLUSHDB, KEYS, CONFIG, DEBUG, MIGRATE, SWAPDB...
        "+@all", "-@admin", "-@dangerous",
    ]  # fmt: skip


def setuser_commands(
    *,
    prefix: str = "certman",
    db: int = 0,
    edge_user: str = "certman-edge",
    pipeline_user: str = "certman-pipeline",
    edge_password: str = "EDGE-PASSWORD",
    pipeline_password: str = "PIPELINE-PASSWORD",
) -> list[list[str]]:
    """The two ``ACL SETUSER`` commands, as argument lists (``" ".join`` them to print)."""
    return [
        ["ACL", "SETUSER", edge_user, "reset", "on", f">{edge_password}", *edge_rules(prefix)],
        [
            "ACL", "SETUSER", pipeline_user, "reset", "on", f">{pipeline_password}",
            *pipeline_rules(prefix, db),
        ],
    ]  # fmt: skip
