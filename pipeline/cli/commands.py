"""The ``certman`` command. Exit status 0 on success, non-zero with a one-line reason otherwise."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from pipeline.cli import api as cli_api
from pipeline.cli import operations as cli_ops
from pipeline.cli.common import (
    CONTEXT_SETTINGS,
    Duration,
    SiteName,
    _Group,
    _print_json,
    _print_json_array,
    cli_actor,
    command_runtime,
)
from pipeline.logformat import LOG_FORMAT_VAR, LogFormatParam, configure
from pipeline.settings import KeyType
from pipeline.version import certman_version


@click.group(cls=_Group, context_settings=CONTEXT_SETTINGS)
@click.version_option(certman_version(), "-V", "--version", prog_name="certman")
@click.option(
    "--log-format",
    type=LogFormatParam(),
    envvar=LOG_FORMAT_VAR,
    default="text",
    show_default=True,
    help="Log lines (and errors) as text, or as one JSON object per line "
    "(default: CERTMAN_LOG_FORMAT).",
)
def main(log_format: str) -> None:
    """certman: HTTPS for thousands of customer-owned domains."""
    if log_format == "json":
        # Text stays Python's default (warnings as bare lines, as ever); JSON is for a log
        # pipeline reading a service's stderr (certman exporter's, a cron job's).
        configure(logging.WARNING, "json")


# --- db ------------------------------------------------------------------------------------------
@main.group(cls=_Group)
def db() -> None:
    """The store's schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply the migrations (creates the SQLite file for the embedded default)."""
    from pipeline import db as store

    store.upgrade(command_runtime().settings.effective_database_url, revision)
    click.echo(f"database at {revision}")


# --- domains -------------------------------------------------------------------------------------
@main.group(cls=_Group)
def domains() -> None:
    """Dealer sites and their names."""


@domains.command("add")
@click.argument("name", type=SiteName())
@click.option(
    "--alias",
    "aliases",
    multiple=True,
    type=SiteName(),
    help="Another name on the same certificate.",
)
@click.option("--upstream", help="Where to proxy the site, e.g. http://10.0.0.5:8080.")
@click.option("--customer-ref", help="The platform's own reference for this site.")
@click.option("--profile", help="ACME profile for this site (default: CERTMAN_ACME_PROFILE).")
@click.option(
    "--key-type",
    type=click.Choice([k.value for k in KeyType]),
    help="Certificate key type for this site (default: CERTMAN_KEY_TYPE).",
)
@click.option("--issuer", help="The issuer to order from first (default: CERTMAN_ISSUERS' first).")
def domains_add(
    name: str,
    aliases: Sequence[str],
    upstream: str | None,
    customer_ref: str | None,
    profile: str | None,
    key_type: str | None,
    issuer: str | None,
) -> None:
    """Add a site and queue its certificate."""
    from pipeline.fleet.changes import publish_and_commit, record_change
    from pipeline.fleet.sites import SiteRules, add_site, parse_site

    process = command_runtime()
    new = parse_site(
        name, aliases, upstream, customer_ref, profile=profile, key_type=key_type, issuer=issuer,
        rules=SiteRules.from_settings(process.settings),
    )  # fmt: skip
    if profile:
        _check_profile(profile, issuer)
    _check_edge_key("nothing was added")
    with process.session_scope() as session:
        site, created = add_site(session, new)
        if created:
            record_change(session, new.domain, "add", cli_actor(), _names_detail(new.names))
        # Published before the commit (the edge can proxy plain HTTP for the site before it has
        # a certificate): a failure on the way leaves no site behind. A re-add of a site that
        # is there publishes it only if the edges lack it (an interrupted earlier add).
        published = publish_and_commit(
            process.publisher, process.session_scope, session, site, unless_current=not created
        )
    if created:
        _kick_dispatch(new.domain)
        click.echo(f"added {new.domain}; issuance queued")
    elif published:
        _kick_dispatch(new.domain)
        click.echo(f"{new.domain} already there; published to the edges again")
    else:
        click.echo(f"{new.domain} already there")


def _names_detail(names: Sequence[str]) -> str:
    return "names " + " ".join(names)


def _check_edge_key(outcome: str) -> None:
    """The edge public key every certificate is sealed to, readable, when this installation
    names one: a site whose certificate could never be sealed is refused before anything is
    written, rather than failing at its first order."""
    from pipeline.crypto.keys import KeyFileError, PublicKey
    from pipeline.fleet.sites import SiteError

    path = command_runtime().settings.edge_public_key
    if path is None:
        return
    try:
        PublicKey.load(path)
    except KeyFileError as exc:
        raise SiteError(f"CERTMAN_EDGE_PUBLIC_KEY {exc}; {outcome}") from None


def _kick_dispatch(domain: str) -> None:
    """Ask for a dispatch now, after the commit (a worker must find the row the message talks
    about). The site is stored and published either way: if the broker cannot take the
    message, beat's dispatcher starts the site at its next tick, so this only says so."""
    from pipeline.tasks.maintenance import kick_dispatch

    try:
        kick_dispatch()
    except Exception as exc:  # kombu's OperationalError, a Redis error: the message only
        click.echo(f"certman: {domain}: dispatch not asked for now ({exc}); beat's dispatcher "
                   "starts it at its next tick", err=True)  # fmt: skip


def _check_profile(profile: str, issuer: str | None) -> None:
    """A profile the issuer the site orders from first offers (its directory's meta.profiles)."""
    from pipeline.acme.profiles import check_profile, offered_profiles

    settings = command_runtime().settings
    known = {spec.name for spec in settings.issuer_list}
    spec = settings.issuer(issuer if issuer in known else None)
    check_profile(profile, offered_profiles(spec), spec.directory)


@domains.command("update")
@click.argument("name", type=SiteName())
@click.option("--add-alias", "add", multiple=True, type=SiteName(), help="A name to add.")
@click.option("--remove-alias", "remove", multiple=True, type=SiteName(), help="A name to drop.")
@click.option("--upstream", help="Where to proxy the site from now on.")
@click.option("--profile", help="ACME profile (one the CA's directory offers).")
@click.option("--key-type", type=click.Choice([k.value for k in KeyType]))
@click.option("--issuer", help="The issuer to order from first, from the next order on.")
@click.option("--json", "as_json", is_flag=True)
def domains_update(
    name: str,
    add: tuple[str, ...],
    remove: tuple[str, ...],
    upstream: str | None,
    profile: str | None,
    key_type: str | None,
    issuer: str | None,
    as_json: bool,
) -> None:
    """Change a site in place. New names, profile or key type order a new certificate (the old
    one is served until it arrives); a new upstream reaches the edges at once."""
    from pipeline.fleet.changes import publish_and_commit, record_change
    from pipeline.fleet.sites import SiteRules, find_site, update_site

    if not (add or remove or upstream or profile or key_type or issuer):
        raise click.UsageError(
            "say what to change: --add-alias, --remove-alias, --upstream, --profile, --key-type, "
            "--issuer"
        )
    process = command_runtime()
    with process.session_scope() as session:
        if profile:
            _check_profile(profile, issuer or find_site(session, name).preferred_issuer)
        done = update_site(
            session, name, add_aliases=add, remove_aliases=remove, upstream=upstream,
            profile=profile, key_type=key_type, issuer=issuer,
            rules=SiteRules.from_settings(process.settings),
        )  # fmt: skip
        if done.changes:
            record_change(session, done.domain, "update", cli_actor(), "; ".join(done.changes))
        if done.new_certificate:
            _check_edge_key("nothing was changed")
        # Names and upstream reach the edges with the commit, or neither does (the certificate
        # follows); published only where the edges' record differs, so a re-run after an
        # interrupted update publishes what that one could not.
        published = publish_and_commit(
            process.publisher,
            process.session_scope,
            session,
            find_site(session, done.domain),
            unless_current=True,
        )
    if done.new_certificate:
        _kick_dispatch(done.domain)
    if as_json:
        _print_json({"domain": done.domain, "changes": done.changes,
                     "new_certificate": done.new_certificate, "note": done.note,
                     "published": published})  # fmt: skip
        return
    if not done.changes:
        again = "; published to the edges again" if published else ""
        click.echo(f"{done.domain}: nothing to change{again}")
        return
    for change in done.changes:
        click.echo(f"{done.domain}: {change}")
    if done.note:
        click.echo(f"{done.domain}: {done.note}")


@domains.command("show")
@click.argument("name", type=SiteName())
@click.option("--attempts", default=10, show_default=True, type=click.IntRange(0, 1000),
              help="How many of the last attempts to show.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True)
def domains_show(name: str, attempts: int, as_json: bool) -> None:
    """One site: names, upstream, state, its certificate, when and why it renews, the order in
    flight, the last attempts and the next one."""
    from pipeline.fleet.site_report import site_report
    from pipeline.models.base import utcnow

    process = command_runtime()
    with process.session_scope() as session:
        report = site_report(
            session, name, now=utcnow(), settings=process.settings, attempts=attempts
        )
    if as_json:
        _print_json(report)
        return
    _show(report)


def _show(report: dict[str, Any]) -> None:
    def line(label: str, value: object) -> None:
        click.echo(f"{label + ':':16}{'-' if value is None or value == '' else value}")

    line("domain", report["domain"])
    line("aliases", " ".join(report["aliases"]))
    line("state", report["state"])
    line("upstream", report["upstream"])
    line("profile", report["profile"] or "(installation default)")
    line("key type", report["key_type"] or "(installation default)")
    line("issuer", report["preferred_issuer"] or "(the first of CERTMAN_ISSUERS)")
    if report["last_error"]:
        line("last error", f"{report['last_error']} ({report['consecutive_failures']} in a row)")
    cert = report["certificate"]
    if cert is None:
        line("certificate", "none yet")
    else:
        click.echo("certificate:")
        line("  serial", cert["serial"])
        line("  issuer", f"{cert['issuer']} ({cert['issued_by'] or 'the first issuer'})")
        line("  valid", f"{cert['not_before']} to {cert['not_after']}")
        line("  key", f"{cert['key_type']}, sealed {cert['scheme']} to key {cert['key_id']}")
        line("  profile", cert["profile"])
        renewal = report["renewal"]
        line("  renews", f"{renewal['renew_at']}{' (due)' if renewal['due'] else ''}")
        line("  why", renewal["why"])
        ari = renewal["ari"]
        exempt = "; a renewal now carries replaces inside it: no issuance tokens spent"
        line("  ARI", ari["why"] + (exempt if ari["exempt_now"] else ""))
    order = report["order"]
    if order is None:
        line("order", "none in flight")
    else:
        click.echo("order in flight:")
        line("  id", f"{order['order_id']} ({order['kind']}), step {order['step']}")
        line("  issuer", order["issuer"] or "(not chosen yet)")
        if order["fallback_reason"]:
            line("  fallback", order["fallback_reason"])
        if order["replaces"]:
            counted = (
                "inside the CA's ARI window: spends no issuance tokens"
                if order["exempt"]
                else "outside the CA's ARI window: counted like any order"
            )
            line("  replaces", f"{order['replaces']} ({counted})")
        line("  touched", f"{order['touched_at']} (step tries {order['step_tries']})")
        waiting = order["rate_limit"]
        if waiting is not None:
            wait = f"{waiting['wait_seconds']:g} s from now"
            line("  waiting", f"rate limit bucket {waiting['bucket']} until {waiting['until']} "
                              f"({wait}): {waiting['reason']}")  # fmt: skip
        line("  task", f"{order['task']} args {order['task_args']} (search Flower for it)")
    nxt = report["next_attempt"]
    line("next attempt", nxt["note"] or f"{nxt['kind']} at {nxt['at']}")
    if not report["attempts"]:
        click.echo("attempts: none recorded")
        _show_history(report["history"])
        return
    click.echo("attempts (newest first):")
    click.echo(f"  {'AT':32}  {'STEP':18}  {'OUTCOME':7}  {'ERROR':16}  DETAIL")
    for a in report["attempts"]:
        click.echo(f"  {a['at']:32}  {a['step']:18}  {a['outcome']:7}  "
                   f"{a['error_type'] or '-':16}  {a['detail'] or ''}")  # fmt: skip
    _show_history(report["history"])


def _show_history(history: list[dict[str, Any]]) -> None:
    if not history:
        click.echo("history: no change recorded")
        return
    click.echo("history (newest first):")
    for change in history:
        click.echo(f"  {change['at']:32}  {change['action']:7}  {change['actor']:24}  "
                   f"{change['detail'] or ''}")  # fmt: skip


@domains.command("remove")
@click.argument("name", type=SiteName())
def domains_remove(name: str) -> None:
    """Remove a site: stop its orders, and take its certificate off every edge."""
    from pipeline.fleet.changes import record_change, unpublish_and_commit
    from pipeline.fleet.sites import remove_site

    process = command_runtime()
    with process.session_scope() as session:
        domain = remove_site(session, name).domain
        record_change(session, domain, "remove", cli_actor())
        # Off the edges before the commit: a removal the edges cannot hear of is not made.
        unpublish_and_commit(process.publisher, process.session_scope, session, domain)
    click.echo(f"removed {domain}")


@domains.command("retry")
@click.argument("names", nargs=-1, type=SiteName())
@click.option("--blocked", is_flag=True, help="Every site blocked by a refusal.")
@click.option(
    "--retrying", is_flag=True, help="Every site (or renewal) waiting to try again after a failure."
)
@click.option("--json", "as_json", is_flag=True)
def domains_retry(names: tuple[str, ...], blocked: bool, retrying: bool, as_json: bool) -> None:
    """Try sites that wait on a failure again now (after DNS or CAA was put right)."""
    from pipeline.fleet.sites import retry_sites
    from pipeline.tasks.maintenance import kick_dispatch

    if not names and not blocked and not retrying:
        raise click.UsageError("name the sites, or say --blocked and/or --retrying")
    with command_runtime().session_scope() as session:
        retried = retry_sites(session, names, blocked=blocked, retrying=retrying)
    if retried:
        kick_dispatch()  # after the commit, as for domains add
    if as_json:
        _print_json([{"domain": domain, "was": was} for domain, was in retried])
        return
    for domain, was in retried:
        click.echo(f"{domain}: was {was}; queued")
    if not retried:
        click.echo("no site waiting")


@domains.command("list")
@click.option("--json", "as_json", is_flag=True, help="A JSON array (the scripting contract).")
@click.option(
    "--state",
    type=click.Choice(["pending", "issuing", "active", "renewing", "retrying", "blocked"]),
    help="Only the sites in this state.",
)
@click.option(
    "--expiring-within",
    type=Duration(),
    help="Only the sites whose certificate expires within this (7d, 12h).",
)
def domains_list(as_json: bool, state: str | None, expiring_within: timedelta | None) -> None:
    """Every site with its state, expiry and last error, by domain (streamed: any fleet size)."""
    from pipeline.fleet.sites import iter_sites
    from pipeline.models.base import utcnow

    before = utcnow() + expiring_within if expiring_within else None
    with command_runtime().session_scope() as session:
        rows = iter_sites(session, state=state, expiring_before=before)
        if as_json:
            _print_json_array(rows)
            return
        shown = 0
        for row in rows:
            if not shown:
                click.echo(f"{'STATE':9}  {'EXPIRES':17}  {'RENEWS':17}  {'ALIASES':>7}  DOMAIN")
            shown += 1
            error = f"  ({row['last_error']})" if row["last_error"] else ""
            click.echo(
                f"{row['state']:9}  {_minute(row['not_after']):17}  {_minute(row['renew_at']):17}"
                f"  {len(row['aliases']):>7}  {row['domain']}{error}"
            )
    if not shown:
        click.echo("no sites match" if state or expiring_within else "no sites")


def _minute(iso: str | None) -> str:
    # "2025-06-01T12:00:00+00:00" -> "2025-06-01 12:00Z": fixed width, UTC said once.
    return f"{iso[:10]} {iso[11:16]}Z" if iso else "-"


# --- keys ----------------------------------------------------------------------------------------
@main.group(cls=_Group)
def keys() -> None:
    """Edge keys that certificate keys are sealed to, and the distribution signing key."""


@keys.command("generate")
@click.option("--dir", "directory", type=click.Path(path_type=Path), required=True)
@click.option(
    "--purpose",
    type=click.Choice(["envelope", "signing"]),
    default="envelope",
    show_default=True,
    help="envelope: an edge key pair certificate keys are sealed to; signing: the pipeline's "
    "Ed25519 distribution signing key (its .pub goes to the edges).",
)
@click.option(
    "--scheme",
    type=click.Choice(["hpke-x25519", "hpke-xwing", "legacy-rsa"]),
    default=None,
    help="Envelope scheme (envelope keys only).  [default: hpke-x25519]",
)
def keys_generate(directory: Path, purpose: str, scheme: str | None) -> None:
    """Write DIR/<key id>.key (mode 0600) and DIR/<key id>.pub; print the key id."""
    if purpose == "signing":
        if scheme is not None:
            raise click.UsageError("--scheme applies to envelope keys only")
        from pipeline.crypto.signing import SigningKey

        click.echo(SigningKey.generate().write(directory))
        return
    from pipeline.crypto.keys import generate_keypair
    from pipeline.crypto.schemes import Scheme

    click.echo(generate_keypair(directory, Scheme(scheme or "hpke-x25519")))


@keys.command("status")
@click.option("--json", "as_json", is_flag=True)
def keys_status(as_json: bool) -> None:
    """Envelopes per scheme and key id, and records per signing key: retire a key when none
    is left on it."""
    from pipeline.fleet.status import envelope_counts, signing_report

    process = command_runtime()
    with process.session_scope() as session:
        rows = envelope_counts(session)
    signing = signing_report(process.redis, process.settings)
    if as_json:
        _print_json(
            [{"purpose": "envelope", **row} for row in rows]
            + [{"purpose": "signing", **row} for row in signing.rows()]
        )
        return
    for row in rows:
        click.echo(f"{row['scheme']:12} {row['key_id']:18} {row['certificates']}")
    if signing.error:
        click.echo(f"signing key in use: unreadable: {signing.error}")
    else:
        made = signing.in_use or "none yet (made on the first publication)"
        click.echo(f"signing key in use: {made} ({signing.path})")
    for key_id, counts in sorted(signing.signers.items()):
        mark = " (in use)" if key_id == signing.in_use else ""
        click.echo(
            f"signed by {key_id}{mark}: {counts.records} records, {counts.tombstones} tombstones"
        )
    if signing.unsigned:
        click.echo(f"unsigned: {signing.unsigned} sites: run certman snapshot resync")


# --- snapshot ------------------------------------------------------------------------------------
@main.group(cls=_Group)
def snapshot() -> None:
    """What the edges read from Redis."""


@snapshot.command("resync")
def snapshot_resync() -> None:
    """Rebuild the edges' snapshot in Redis from the store (after Redis lost its data)."""
    process = command_runtime()
    with process.session_scope() as session:
        count = process.publisher.resync(session)
    click.echo(f"snapshot rebuilt: {count} sites")


@snapshot.command("reconcile")
@click.option("--dry-run", is_flag=True, help="Only report where Redis and the store differ.")
@click.option("--json", "as_json", is_flag=True)
def snapshot_reconcile(dry_run: bool, as_json: bool) -> None:
    """Publish sites the snapshot lacks or has wrong; remove sites the store no longer has."""
    process = command_runtime()
    if dry_run:
        with process.session_scope() as session:
            drift = process.publisher.find_drift(session)
    else:
        drift = process.publisher.reconcile(process.session_scope, limit=None)
    if as_json:
        _print_json(
            {"stale": drift.stale, "extra": drift.extra, "fixed": not dry_run,
             "unsigned": drift.unsigned}
        )  # fmt: skip
        return
    stale, extra = ("differ", "to remove") if dry_run else ("published again", "removed")
    click.echo(f"{len(drift.stale)} sites {stale}{_some(drift.stale)}")
    if drift.unsigned:
        click.echo(f"  of which {len(drift.unsigned)} not signed as the store says")
    click.echo(f"{len(drift.extra)} sites {extra}{_some(drift.extra)}")


def _some(domains: list[str], shown: int = 20) -> str:
    if not domains:
        return ""
    more = f" and {len(domains) - shown} more" if len(domains) > shown else ""
    return ": " + " ".join(domains[:shown]) + more


# --- status --------------------------------------------------------------------------------------
@main.command("status")
@click.option("--json", "as_json", is_flag=True)
def status(as_json: bool) -> None:
    """Sites by state, orders in flight, stuck orders, soonest expiry, rate-limit buckets."""
    from pipeline.fleet.status import collect

    process = command_runtime()
    report = collect(process.session_scope, process.limiter_for, process.settings)
    if as_json:
        _print_json(report)
        return
    for key, value in report.items():
        click.echo(f"{key}: {json.dumps(value, default=str)}")


# Operations commands (orders, renew, exporter) live in their own module.
for _command in (cli_ops.orders, cli_ops.renew, cli_ops.revoke, cli_ops.exporter, cli_api.api):
    main.add_command(_command)
