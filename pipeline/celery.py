"""The Celery app: ``celery -A pipeline worker|beat|flower`` finds ``app`` here by itself.

The configuration comes from, in order: the file named by ``CERTMAN_CELERY_CONFIG``; the
checkout's ``celery.conf.py`` when running from a source checkout (it sits next to the package);
else the defaults the package carries (:mod:`pipeline.celeryconfig`), which is what an installed
wheel uses unless the operator names a file.
"""

from __future__ import annotations

import os
import runpy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import celery.app.amqp
import kombu.transport
from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_process_shutdown
from kombu.transport import redis as kombu_redis

from pipeline import flower_guard, worker_logging

CHECKOUT_CONFIG = Path(__file__).resolve().parent.parent / "celery.conf.py"


def _load_config(path: Path) -> SimpleNamespace:
    values = runpy.run_path(str(path))
    return SimpleNamespace(**{k: v for k, v in values.items() if not k.startswith("_")})


def config_source() -> Path | None:
    """The configuration file in use, or None for the package's defaults."""
    named = os.environ.get("CERTMAN_CELERY_CONFIG")
    if named:
        path = Path(named)
        if not path.is_file():
            # Say which setting is wrong rather than let runpy's traceback guess.
            raise FileNotFoundError(f"CERTMAN_CELERY_CONFIG: no such file: {path}")
        return path
    return CHECKOUT_CONFIG if CHECKOUT_CONFIG.is_file() else None


def _config() -> SimpleNamespace | ModuleType:
    path = config_source()
    if path is not None:
        return _load_config(path)
    from pipeline import celeryconfig

    return celeryconfig


# Tasks Flower need not show: the dispatcher runs every 15 s and would bury the issuance tasks
# an operator looks for during a stuck order. Each also sets ``send_events=False`` (so the
# worker sends no received/started/succeeded events for it); this set covers the one event
# the sender makes, task-sent, which Celery sends for every task or none (off in the package's
# configuration, pipeline.celeryconfig; this holds where an operator turns it back on).
QUIET_TASKS = frozenset({"certman.maintenance.dispatch", "certman.webhooks.dispatch"})


class AMQP(celery.app.amqp.AMQP):  # type: ignore[misc]  # celery ships no type hints
    """Celery's message maker, without the task-sent event of :data:`QUIET_TASKS`."""

    def as_task_v2(self, task_id: str, name: str, *args: Any, **kwargs: Any) -> Any:
        message = super().as_task_v2(task_id, name, *args, **kwargs)
        if name in QUIET_TASKS and message.sent_event is not None:
            return message._replace(sent_event=None)
        return message


class _OneClientPerPool:
    """For kombu's Redis channels: one redis-py client for the channel's connection pool, where
    kombu makes a new one for every message it sends, acknowledges or restores, several times a
    task (the task, the next step's, each event): about 2 % of the workers' CPU samples
    (py-spy, ``benchmarks/issuance.py --profile``).

    A redis-py client holds no connection of its own (it borrows one from the pool for each
    command) and is safe to share; a new pool (kombu makes one after a lost connection or a
    fork) gets a new client. Every command, key and message stays what kombu sends.
    """

    _pooled_client: tuple[Any, Any] | None = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool  # type: ignore[attr-defined]
        held = self._pooled_client
        if held is None or held[0] is not pool:
            held = self._pooled_client = (pool, self._create_client())  # type: ignore[attr-defined]
        yield held[1]


class RedisChannel(_OneClientPerPool, kombu_redis.Channel):
    pass


class SentinelChannel(_OneClientPerPool, kombu_redis.SentinelChannel):
    pass


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport (``redis://``, ``rediss://``) with :class:`RedisChannel`."""

    Channel = RedisChannel


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport (``sentinel://``) with :class:`SentinelChannel`."""

    Channel = SentinelChannel


# kombu picks the transport by the broker URL's scheme, from its alias table: certman's schemes
# get the transports above. (Naming a class in ``broker_transport`` instead would put its path
# in the URL Celery prints and Flower reads the broker's kind from.) Before any connection is
# made: kombu caches what a name resolved to.
kombu.transport.TRANSPORT_ALIASES.update(
    {
        "redis": f"{__name__}:RedisTransport",
        "rediss": f"{__name__}:RedisTransport",
        "sentinel": f"{__name__}:SentinelTransport",
    }
)

app = Celery(
    "certman",
    include=["pipeline.tasks.issuance", "pipeline.tasks.maintenance", "pipeline.tasks.webhooks"],
    amqp=AMQP,
)
app.config_from_object(_config())
flower_guard.install()
worker_logging.install(app)


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # Everything the process holds (engines, Redis, the limiter, the ACME client, the signing
    # key, the publisher) belongs to its runtime: dropped here, in one place, and made again
    # in the child on first use. Only dropped: closing would shut the parent's connections.
    from pipeline import runtime

    runtime.reset()


@worker_init.connect
def _worker_metrics(**_: Any) -> None:
    # The main process, before the pool forks: empty the multiprocess directory and serve the
    # host's /metrics, which sums what every pool child writes there.
    from pipeline import runtime, worker_metrics

    settings = runtime.current().settings
    worker_metrics.start_host_endpoint(
        address=settings.worker_metrics_address, port=settings.worker_metrics_port
    )


@worker_init.connect
def _load_before_fork(**_: Any) -> None:
    # The main process, before the pool forks: what every child would otherwise make again for
    # itself, and that holds no connection or key (those stay per child: see _after_fork).
    from pipeline import names

    names.load_suffix_list()


@worker_process_shutdown.connect
def _child_exited(pid: int | None = None, **_: Any) -> None:
    from pipeline import worker_metrics

    worker_metrics.child_exited(pid)
