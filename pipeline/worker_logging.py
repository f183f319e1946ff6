"""``--log-format`` for the Celery roles (worker, beat, Flower), and each task's log context.

Celery sets up its own handlers (the root logger's, and the task logger's that adds the task's
name and id): rather than replace that set-up, the ``after_setup_logger`` and
``after_setup_task_logger`` signals hand each handler to :func:`pipeline.logformat.use_format`,
so in JSON every line, Celery's and kombu's included, is one JSON object. Flower does not use
Celery's set-up (Tornado's instead), so for Flower the root logger is configured here before
Tornado looks (Tornado adds no handler of its own to a root logger that has one).

The option is one of Celery's "preload" options: Celery adds it to every ``celery``
subcommand (``celery -A pipeline worker --log-format json``, ``beat``, ``flower``) and hands
its value to the ``user_preload_options`` signal before the command runs. Its default is
``CERTMAN_LOG_FORMAT``, so the units' environment file turns JSON on for every role.

In JSON the worker's and beat's start-up banners (drawings of the configuration, printed on
stdout) are left out, as ``-q`` does: a log pipeline would read each of their lines as a record
of its own. The worker still logs "ready" and beat "Starting" as records.

Each task's lines carry ``task`` and ``task_id`` and, for a task whose arguments name them,
``domain`` and ``order_id``, bound from ``task_prerun`` to ``task_postrun`` so that Celery's own
"succeeded"/"retry" lines carry them too.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from contextvars import Token
from typing import Any

import click
from celery import Celery, Task
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    task_postrun,
    task_prerun,
    user_preload_options,
)

from pipeline import logformat

# Task arguments bound as log context when a task's signature names them.
_ARGUMENT_FIELDS = ("domain", "order_id")

_chosen: str | None = None  # from the command line; None: CERTMAN_LOG_FORMAT
_bound: dict[str, Token[dict[str, object]]] = {}  # task id -> the binding task_prerun made
# Task name -> its signature, when the signature names some of _ARGUMENT_FIELDS, else None.
_signatures: dict[str, inspect.Signature | None] = {}


def install(app: Celery) -> None:
    """Add ``--log-format`` to the ``celery`` commands and connect the logging signals."""
    app.user_options["preload"].add(
        logformat.log_format_option(
            "Log as text, or as one JSON object per line (default: CERTMAN_LOG_FORMAT)."
        )
    )
    user_preload_options.connect(_preload, weak=False)
    after_setup_logger.connect(_setup_handlers, weak=False)
    after_setup_task_logger.connect(_setup_handlers, weak=False)
    task_prerun.connect(_task_started, weak=False)
    task_postrun.connect(_task_ended, weak=False)


def chosen_format() -> str:
    """The format asked for: ``--log-format``, else ``CERTMAN_LOG_FORMAT``, else text."""
    return _chosen or logformat.env_format()


def _preload(app: Celery | None = None, options: dict[str, Any] | None = None, **_: Any) -> None:
    global _chosen
    value = (options or {}).get("log_format")
    if value is None:
        return
    _chosen = value
    if value != "json":
        return
    ctx = click.get_current_context(silent=True)
    command = ctx.info_name if ctx is not None else None
    # JSON from here on, not only from Celery's set-up: what is said before it (a warning at
    # start, the worker_init handlers' lines) would otherwise be plain text. Flower keeps this
    # handler (Tornado adds none to a root logger that has one, and sets its level to INFO
    # later); the worker and beat replace it with Celery's set-up, made JSON below.
    logformat.configure(logging.WARNING, "json")
    logging.captureWarnings(True)
    if command in ("worker", "beat") and ctx is not None and ctx.obj is not None:
        ctx.obj.quiet = True  # the banners: see the module's docstring


def _setup_handlers(logger: logging.Logger | None = None, **_: Any) -> None:
    log_format = chosen_format()
    if logger is None or log_format == "text":
        return  # Celery's own text format, as before
    for handler in logger.handlers:
        logformat.use_format(handler, log_format)


def _task_started(
    task_id: str | None = None,
    task: Task | None = None,
    args: tuple[Any, ...] | None = None,
    kwargs: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    if task is None or task_id is None:
        return
    fields: dict[str, object] = {"task": task.name, "task_id": task_id}
    if task.name not in _signatures:
        _signatures[task.name] = _naming_signature(task)
    signature = _signatures[task.name]
    if signature is not None:
        try:
            given = signature.bind_partial(*(args or ()), **(kwargs or {})).arguments
        except TypeError:
            given = {}  # called with arguments it does not take: Celery will say so
        fields.update({name: given[name] for name in _ARGUMENT_FIELDS if name in given})
    _bound[task_id] = logformat.bind(**fields)


def _task_ended(task_id: str | None = None, **_: Any) -> None:
    token = _bound.pop(task_id or "", None)
    if token is not None:
        # ValueError: bound in another context (a pool that switched threads); it ends with it.
        with contextlib.suppress(ValueError):
            logformat.unbind(token)


def _naming_signature(task: Task) -> inspect.Signature | None:
    try:
        signature = inspect.signature(task.run)
    except (TypeError, ValueError):
        return None
    return signature if set(_ARGUMENT_FIELDS) & set(signature.parameters) else None
