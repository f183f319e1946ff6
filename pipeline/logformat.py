"""How every role writes its log: text for a person at a terminal, or one JSON object per line
for a log pipeline (Loki, Elasticsearch, Cloud Logging: they read JSON, not a format string).

The JSON lines carry the text format's fields under stable names (``time`` in ISO 8601 UTC,
``level``, ``logger``, ``process``, ``message``) and, where the code that logged knew them,
``domain``, ``order_id``, ``step`` and ``issuer``, and inside a Celery task ``task`` (its name)
and ``task_id``: passed as ``extra=`` on the call, or bound for a stretch of work with
:func:`log_context` (a task binds its order once, and every line logged inside it, by certman or
by a library, carries it). A traceback is one ``exc_info`` field, never extra lines that a
pipeline would read as separate records. Any other ``extra`` a library attaches is left out:
the fields are a contract, and a library's extras can carry task arguments.

Every role takes ``--log-format text|json``, and reads ``CERTMAN_LOG_FORMAT`` when not given
it (:func:`env_format`), so one line in the units' environment file turns JSON on for all.

python-json-logger does the serialising (exceptions, non-JSON values, escaping); it is the
formatter most Python services use and is maintained. This module imports nothing of certman's,
so the edge can use it without the pipeline's services (click, for the option, is light).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import IO, Any

import click
from pythonjsonlogger.json import JsonFormatter

LOG_FORMATS = ("text", "json")
LOG_FORMAT_VAR = "CERTMAN_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
CONTEXT_FIELDS = ("domain", "order_id", "step", "issuer", "task", "task_id")
_JSON_FIELDS = ("time", "level", "logger", "process", "message", *CONTEXT_FIELDS)
_RENAMED = {"asctime": "time", "levelname": "level", "name": "logger"}

# Never mutated: log_context binds a new dict and resets to the old one.
_EMPTY: dict[str, object] = {}
_context: ContextVar[dict[str, object]] = ContextVar("certman_log_context", default=_EMPTY)


# The format configure() or use_format() last set up in this process.
_active = "text"


def env_format(environ: Mapping[str, str] = os.environ) -> str:
    """The format ``CERTMAN_LOG_FORMAT`` names (``text`` when unset); :class:`ValueError`
    naming the variable for anything else."""
    value = environ.get(LOG_FORMAT_VAR, "").strip().lower() or "text"
    if value not in LOG_FORMATS:
        raise ValueError(
            f"{LOG_FORMAT_VAR}: must be one of {', '.join(LOG_FORMATS)}, not {value!r}"
        )
    return value


class LogFormatParam(click.ParamType[str]):
    """``--log-format`` on a click command: ``text`` or ``json``, any case; an error names the
    variable too, since the value may have come from it (the option's ``envvar``)."""

    name = "text|json"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        if text not in LOG_FORMATS:
            self.fail(
                f"{value!r} is not one of {', '.join(LOG_FORMATS)} "
                f"(from --log-format or {LOG_FORMAT_VAR})",
                param,
                ctx,
            )
        return text


def log_format_option(help_text: str) -> click.Option:
    """The ``--log-format`` option every certman command and Celery role takes."""
    return click.Option(
        ["--log-format"],
        type=LogFormatParam(),
        envvar=LOG_FORMAT_VAR,
        default="text",
        show_default=True,
        help=help_text,
    )


def active_format() -> str:
    """``json`` once this process's logging was set up for JSON, else ``text``."""
    return _active


def bind(**fields: object) -> Token[dict[str, object]]:
    """Bind fields until :func:`unbind` (for a start and an end that are two callbacks, such
    as Celery's task_prerun and task_postrun); :func:`log_context` where one block will do."""
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"not log context fields: {', '.join(sorted(unknown))}")
    return _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})


def unbind(token: Token[dict[str, object]]) -> None:
    _context.reset(token)


@contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Every line logged inside carries these fields (None values are left out)."""
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


class ContextFilter(logging.Filter):
    """Copies the bound context onto each record; a field given as ``extra=`` wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _context.get().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


class CertmanJsonFormatter(JsonFormatter):
    """One JSON object per record, with exactly the fields this module's docstring names."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s",
            rename_fields=_RENAMED,
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        for name in list(log_data):
            if name not in _JSON_FIELDS and name not in ("exc_info", "stack_info"):
                del log_data[name]
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                log_data[name] = value


def formatter(log_format: str) -> logging.Formatter:
    """The formatter for ``text`` or ``json``; anything else is a one-line error."""
    if log_format == "json":
        return CertmanJsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")


def configure(level: str | int, log_format: str = "text", stream: IO[str] | None = None) -> None:
    """The root logger writes to ``stream`` (stderr) in ``log_format``, replacing its handlers."""
    global _active
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(log_format))
    _active = log_format
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)


def use_format(handler: logging.Handler, log_format: str) -> None:
    """Give a handler someone else set up (Celery's) certman's format and context."""
    global _active
    handler.setFormatter(formatter(log_format))
    _active = log_format
    if not any(isinstance(f, ContextFilter) for f in handler.filters):
        handler.addFilter(ContextFilter())
