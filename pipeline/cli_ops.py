"""Operations commands of ``certman``: added to the main group by pipeline.cli."""

from __future__ import annotations

import re
from datetime import timedelta

import click

from pipeline.cli_common import _Group, _print_json
from pipeline.settings import get_settings

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")


def parse_duration(text: str) -> timedelta:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"90s"`` (the units of the rate-limit settings)."""
    match = _DURATION_RE.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"invalid duration {text!r}: use a positive number and s, m, h or d")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


class _Duration(click.ParamType[timedelta]):
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


# --- orders --------------------------------------------------------------------------------------
@click.group(cls=_Group)
def orders() -> None:
    """ACME orders in flight."""


@orders.command("stuck")
@click.option("--json", "as_json", is_flag=True, help="A JSON array of objects.")
@click.option(
    "--older-than",
    type=_Duration(),
    default=None,
    help="Untouched for longer than this (default: CERTMAN_STUCK_AFTER).",
)
def orders_stuck(as_json: bool, older_than: timedelta | None) -> None:
    """Unfinished orders that no task has touched for a while, oldest first."""
    from pipeline.db import session_scope
    from pipeline.models.base import utcnow
    from pipeline.upkeep import find_stuck

    stuck_after = older_than.total_seconds() if older_than else get_settings().stuck_after
    now = utcnow()
    with session_scope() as session:
        rows = find_stuck(session, now=now, stuck_after=stuck_after, with_attempts=True)
    if as_json:
        _print_json([row.as_dict(now) for row in rows])
        return
    for row in rows:
        click.echo(
            f"{row.domain:50} order {row.order_id:<8} {row.step:10} {row.age(now):>9.0f}s "
            f"step_tries={row.step_tries} attempts={row.attempts}"
        )


# --- renew ---------------------------------------------------------------------------------------
@click.command("renew")
@click.option("--scheme", help="Renew every certificate sealed with this scheme (legacy-rsa…).")
@click.option("--key-id", help="Renew every certificate sealed to this edge key.")
@click.option(
    "--within", type=_Duration(), required=True, help="Spread the renewals over this (7d, 12h)."
)
def renew(scheme: str | None, key_id: str | None, within: timedelta) -> None:
    """Re-seal to the current edge key: bring renewals forward, spread evenly over --within."""
    from pipeline.db import session_scope
    from pipeline.envelope import Scheme
    from pipeline.models.base import utcnow
    from pipeline.renewal import schedule_reseal

    if (scheme is None) == (key_id is None):
        raise click.UsageError("give exactly one of --scheme and --key-id")
    if scheme is not None and scheme not in {s.value for s in Scheme}:
        raise ValueError(f"unknown scheme {scheme!r}: one of {', '.join(s.value for s in Scheme)}")
    with session_scope() as session:
        n = schedule_reseal(session, scheme=scheme, key_id=key_id, within=within, now=utcnow())
    what = f"scheme {scheme}" if scheme else f"key {key_id}"
    click.echo(f"{n} certificates sealed with {what} scheduled for renewal within {within}")


# --- exporter ------------------------------------------------------------------------------------
@click.command("exporter")
@click.option("--port", type=click.IntRange(1, 65535), required=True)
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on: loopback unless Prometheus scrapes from another host.",
)
def exporter(port: int, address: str) -> None:
    """Serve inventory metrics for Prometheus on http://ADDRESS:PORT/metrics.

    The metrics name every site's state and the fleet's size: keep them on loopback, or behind
    a firewall that lets only Prometheus in, when listening elsewhere.
    """
    from pipeline.exporter import run_forever

    settings = get_settings()
    click.echo(f"certman exporter on http://{address}:{port}/metrics")
    run_forever(settings, port=port, address=address)
