"""What every ``certman`` command shares: the group class that turns users' errors into one
line, and JSON output. (pipeline.cli builds the command tree; pipeline.cli_ops adds to it.)"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click
import redis
import sqlalchemy.exc

from pipeline.keys import KeyFileError
from pipeline.settings import SettingsError

# -h as well as --help, on every group and command (child contexts inherit it).
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}

# Errors a user can act on: shown as one line, never as a traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (
    SettingsError,
    KeyFileError,  # a key file missing, open to others, or of the wrong kind
    ValueError,  # InvalidName, SiteError, a bad rate string
    OSError,
    sqlalchemy.exc.OperationalError,
    redis.exceptions.ConnectionError,
)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _USER_ERRORS as exc:
            _fail(_one_line(exc))


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, sqlalchemy.exc.OperationalError):
        return f"database unavailable: {str(exc.orig).strip().splitlines()[0]}"
    if isinstance(exc, redis.exceptions.ConnectionError):
        return f"Redis unavailable: {exc}"
    if isinstance(exc, KeyFileError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _fail(message: str) -> NoReturn:
    click.echo(f"certman: {message}", err=True)
    sys.exit(1)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))
