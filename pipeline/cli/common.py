"""What every ``certman`` command shares: the group class that turns users' errors into one
line, and JSON output. (pipeline.cli.commands builds the command tree; pipeline.cli.operations
adds to it.)"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn

import click
import redis
import sqlalchemy.exc

from pipeline import logformat
from pipeline.crypto.keys import KeyFileError
from pipeline.errors import IssuanceProblem
from pipeline.settings import SettingsError, get_settings

if TYPE_CHECKING:
    from pipeline.runtime import Runtime

# -h as well as --help, on every group and command (child contexts inherit it).
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}

# Errors a user can act on: shown as one line, never as a traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (
    SettingsError,
    KeyFileError,  # a key file missing, open to others, or of the wrong kind
    ValueError,  # InvalidName, SiteError, a bad rate string
    OSError,
    sqlalchemy.exc.OperationalError,
    # The store refusing a change (a constraint or trigger, a failed commit): nothing written.
    sqlalchemy.exc.DBAPIError,
    redis.exceptions.ConnectionError,
    redis.exceptions.RedisError,  # refused: an ACL without the right, a read-only replica
    IssuanceProblem,  # the CA unreachable or refusing (certman revoke)
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
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        return f"the database refused the change: {str(exc.orig).strip().splitlines()[0]}"
    if isinstance(exc, redis.exceptions.ConnectionError):
        return f"Redis unavailable: {exc}"
    if isinstance(exc, redis.exceptions.RedisError):
        return f"Redis refused: {str(exc).strip().splitlines()[0]}"
    if isinstance(exc, KeyFileError):
        return str(exc)
    if isinstance(exc, IssuanceProblem):
        return exc.reason
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _fail(message: str) -> NoReturn:
    if logformat.active_format() == "json":
        # --log-format json: stderr is read by a log pipeline, one JSON object per line.
        logging.getLogger("certman").error(message)
    else:
        click.echo(f"certman: {message}", err=True)
    sys.exit(1)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _print_json_array(items: Iterable[Any], *, chunk: int = 500) -> None:
    """A JSON array written ``chunk`` elements at a time, as ``_print_json`` would write the
    whole list: a listing of 100,000 sites never sits in memory, nor costs a write each."""
    parts: list[str] = []
    first = True
    for item in items:
        text = json.dumps(item, indent=2, default=str).replace("\n", "\n  ")
        parts.append(("[\n  " if first else ",\n  ") + text)
        first = False
        if len(parts) >= chunk:
            click.echo("".join(parts), nl=False)
            parts.clear()
    click.echo("".join(parts) + ("[]" if first else "\n]"))


# --- parameter types -----------------------------------------------------------------------------
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")


def parse_duration(text: str) -> timedelta:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"90s"`` (the units of the rate-limit settings)."""
    match = _DURATION_RE.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"invalid duration {text!r}: use a positive number and s, m, h or d")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


class Duration(click.ParamType[timedelta]):
    name = "duration"

    def convert(
        self, value: str | timedelta, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class SiteName(click.ParamType[str]):
    """A domain name as typed: one that starts with ``-`` is an option the user meant to give
    (``--alias --upstream URL`` takes ``--upstream`` for the alias), said so in one line."""

    name = "name"

    def convert(self, value: str, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if value.startswith("-"):
            option = param is not None and param.param_type_name == "option" and param.opts
            what = f"the value of {param.opts[0]}" if option and param else "a name"
            # A ValueError, not click's usage error: one line, exit status 1, like any bad name.
            raise ValueError(f"{value!r} looks like an option, not a domain name: give {what}")
        return value


def cli_actor(tool: str = "cli") -> str:
    """Who a command's change is recorded as in a site's history: ``<tool>:<unix user>``
    (``cli`` for ``certman``, ``onboard`` for the bulk onboarding script)."""
    import getpass
    import os

    try:
        return f"{tool}:{getpass.getuser()}"
    except (KeyError, OSError):  # no name for this uid (a container's arbitrary user)
        return f"{tool}:uid={os.getuid()}"


def command_runtime() -> Runtime:
    """The command's runtime, on click's context object: the one a test gave
    (``main(obj=runtime)``, ``CliRunner().invoke(main, obj=runtime)``), or one made from the
    settings on first use and closed when the command ends."""
    root = click.get_current_context().find_root()
    if root.obj is None:
        from pipeline.runtime import Runtime

        root.obj = Runtime(get_settings())
        root.call_on_close(root.obj.close)
    runtime: Runtime = root.obj
    return runtime
