"""Operations commands of ``certman``: added to the main group by pipeline.cli.commands."""

from __future__ import annotations

from datetime import datetime, timedelta

import click

from pipeline.cli.common import (
    Duration,
    SiteName,
    _Group,
    _print_json,
    cli_actor,
    command_runtime,
)


# --- orders --------------------------------------------------------------------------------------
@click.group(cls=_Group)
def orders() -> None:
    """ACME orders in flight."""


@orders.command("stuck")
@click.option("--json", "as_json", is_flag=True, help="A JSON array of objects.")
@click.option(
    "--older-than",
    type=Duration(),
    default=None,
    help="Untouched for longer than this (default: CERTMAN_STUCK_AFTER).",
)
def orders_stuck(as_json: bool, older_than: timedelta | None) -> None:
    """Unfinished orders that no task has touched for a while, oldest first."""
    from pipeline.fleet.upkeep import find_stuck
    from pipeline.models.base import utcnow

    stuck_after = (
        older_than.total_seconds() if older_than else command_runtime().settings.stuck_after
    )
    now = utcnow()
    with command_runtime().session_scope() as session:
        rows = find_stuck(session, now=now, stuck_after=stuck_after, with_attempts=True)
    if as_json:
        _print_json([row.as_dict(now) for row in rows])
        return
    if not rows:
        click.echo(f"no stuck orders (none untouched for longer than {stuck_after:.0f}s)")
        return
    click.echo(
        f"{'ORDER':>8}  {'STEP':10}  {'KIND':5}  {'AGE':>9}  {'TRIES':>5}  {'ATTEMPTS':>8}  DOMAIN"
    )
    for row in rows:
        click.echo(
            f"{row.order_id:>8}  {row.step:10}  {row.kind:5}  {row.age(now):>8.0f}s  "
            f"{row.step_tries:>5}  {row.attempts:>8}  {row.domain}"
        )


# --- renew ---------------------------------------------------------------------------------------
@click.command("renew")
@click.argument("names", nargs=-1, type=SiteName())
@click.option("--now", "now_", is_flag=True, help="Renew the named sites now.")
@click.option("--all", "all_", is_flag=True, help="Renew every certificate (spread over --within).")
@click.option("--scheme", help="Renew every certificate sealed with this scheme (legacy-rsa…).")
@click.option("--key-id", help="Renew every certificate sealed to this edge key.")
@click.option("--within", type=Duration(), help="Spread the renewals over this (7d, 12h).")
@click.option("--json", "as_json", is_flag=True)
def renew(
    names: tuple[str, ...],
    now_: bool,
    all_: bool,
    scheme: str | None,
    key_id: str | None,
    within: timedelta | None,
    as_json: bool,
) -> None:
    """Bring renewals forward: NAME... --now; every certificate (--all), or those sealed with a
    scheme or to an edge key (--scheme, --key-id: re-seal to the current edge key), spread
    evenly over --within. Dispatch starts them like any renewal, under the in-flight bound and
    the rate limits; the old certificate is served until the new one is stored."""
    from pipeline.models.base import utcnow
    from pipeline.tasks.maintenance import kick_dispatch

    now = utcnow()
    if names or now_:
        if not names or not now_:
            raise click.UsageError("name the sites and say --now (or use --all --within)")
        if all_ or scheme or key_id or within:
            raise click.UsageError("NAME... --now goes with no other option")
        from pipeline.fleet.renewal_requests import renew_now

        with command_runtime().session_scope() as session:
            scheduled = renew_now(session, names, now=now, actor=cli_actor())
        kick_dispatch()  # after the commit, as for domains add
        if as_json:
            _print_json([{"domain": s.domain, "serial": s.serial, "renew_at": s.renew_at}
                         for s in scheduled])  # fmt: skip
            return
        for s in scheduled:
            click.echo(f"{s.domain}: renewal queued; certificate {s.serial} is served until then")
        return
    if sum((all_, scheme is not None, key_id is not None)) != 1:
        raise click.UsageError("give NAME... --now, or exactly one of --all, --scheme, --key-id")
    if within is None:
        raise click.UsageError("--within says over how long to spread the renewals (7d, 12h)")
    if all_:
        from pipeline.fleet.renewal_requests import renew_all

        with command_runtime().session_scope() as session:
            n = renew_all(session, within=within, now=now)
        what = "every certificate"
    else:
        n, what = _reseal(scheme, key_id, within, now)
    if as_json:
        _print_json({"scheduled": n, "within_seconds": within.total_seconds()})
        return
    click.echo(f"{n} certificates ({what}) scheduled for renewal within {within}")


def _reseal(
    scheme: str | None, key_id: str | None, within: timedelta, now: datetime
) -> tuple[int, str]:
    from sqlalchemy import select

    from pipeline.crypto.schemes import Scheme
    from pipeline.fleet.renewal import schedule_reseal
    from pipeline.models import Certificate

    if scheme is not None and scheme not in {s.value for s in Scheme}:
        raise ValueError(f"unknown scheme {scheme!r}: one of {', '.join(s.value for s in Scheme)}")
    with command_runtime().session_scope() as session:
        if key_id is not None:
            in_use = set(
                session.scalars(select(Certificate.key_id).where(Certificate.current).distinct())
            )
            if key_id not in in_use:
                known = ", ".join(sorted(in_use)) or "none"
                raise ValueError(
                    f"no current certificate is sealed to key {key_id!r} (key ids in use: {known})"
                )
        n = schedule_reseal(session, scheme=scheme, key_id=key_id, within=within, now=now)
    return n, f"sealed with scheme {scheme}" if scheme else f"sealed to key {key_id}"


# --- revoke --------------------------------------------------------------------------------------
_REASONS = ["unspecified", "keyCompromise", "affiliationChanged", "superseded",
            "cessationOfOperation"]  # fmt: skip


@click.command("revoke")
@click.argument("name", type=SiteName())
@click.option(
    "--reason",
    type=click.Choice(_REASONS),
    default="unspecified",
    show_default=True,
    help="RFC 5280 reason code sent to the CA.",
)
@click.option("--json", "as_json", is_flag=True)
def revoke(name: str, reason: str, as_json: bool) -> None:
    """Revoke a site's certificate at the CA, then order a new one at once (the revoked one is
    served until it arrives)."""
    from pipeline.fleet.revocation import Reason, revoke_site
    from pipeline.models.base import utcnow
    from pipeline.tasks.maintenance import kick_dispatch

    process = command_runtime()
    done = revoke_site(
        process.session_scope, process.acme_for, name, reason=Reason[reason], now=utcnow(),
        actor=cli_actor(),
    )  # fmt: skip
    kick_dispatch()
    if as_json:
        _print_json({"domain": done.domain, "serial": done.serial, "reason": done.reason.name,
                     "already_revoked": done.already})  # fmt: skip
        return
    again = " (it was already revoked)" if done.already else ""
    click.echo(f"{done.domain}: certificate {done.serial} revoked{again}; a new one is queued")


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

    process = command_runtime()
    click.echo(f"certman exporter on http://{address}:{port}/metrics")
    run_forever(process.settings, process.redis, process.limiter, port=port, address=address)
