"""``certman api webhooks add|list|remove``: the platform's subscriptions to certman's events.

A click group of its own, mounted under ``certman api`` (see pipeline/cli/api.py).
"""

from __future__ import annotations

import click

from pipeline.cli.common import CONTEXT_SETTINGS, _Group, _print_json, command_runtime
from pipeline.crypto.keys import load_or_create_pipeline_key
from pipeline.webhooks import events, subscriptions, transport


@click.group("webhooks", cls=_Group, context_settings=CONTEXT_SETTINGS)
def webhooks() -> None:
    """Signed webhooks to the platform (Standard Webhooks)."""


@webhooks.command("add")
@click.argument("url")
@click.option(
    "--events",
    "event_types",
    required=True,
    help=f"Comma-separated event types: {','.join(events.EVENT_TYPES)}.",
)
@click.option("--json", "as_json", is_flag=True)
def webhooks_add(url: str, event_types: str, as_json: bool) -> None:
    """Subscribe URL to events; prints the signing secret, once."""
    process = command_runtime()
    key = load_or_create_pipeline_key(process.settings.effective_pipeline_key)
    wanted = subscriptions.parse_events(event_types)
    with process.session_scope() as session:
        subscription, secret = subscriptions.add(
            session, url, wanted, pipeline_key=key.public_key(),
            policy=transport.WebhookPolicy(
                allowed_networks=tuple(process.settings.webhook_allowed_networks)
            ),
        )  # fmt: skip
        shown = {"id": subscription.id, "url": subscription.url_shown,
                 "events": list(subscription.events), "secret": secret}  # fmt: skip
    if as_json:
        _print_json(shown)
        return
    click.echo(f"webhook {shown['id']}: {shown['url']} ({', '.join(wanted)})")
    click.echo(f"secret: {secret}")
    click.echo("The secret is shown this once: keep it where the receiver verifies signatures.")


@webhooks.command("list")
@click.option("--json", "as_json", is_flag=True)
def webhooks_list(as_json: bool) -> None:
    """Subscriptions, with deliveries, failures and the last attempt's status."""
    with command_runtime().session_scope() as session:
        rows = subscriptions.listing(session)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        click.echo("no webhook subscriptions")
        return
    for row in rows:
        last = (
            "never tried"
            if row["last_attempt_at"] is None
            else f"last {row['last_attempt_at'][:19]}Z: "
            + (row["last_error"] or f"HTTP {row['last_status_code']}")
        )
        click.echo(
            f"{row['id']}  {row['url']}  {','.join(row['events'])}\n"
            f"    delivered {row['delivered']}, pending {row['pending']}, failed attempts "
            f"{row['failed_attempts']}, given up {row['given_up']}; {last}"
        )


@webhooks.command("remove")
@click.argument("subscription_id", metavar="ID", type=int)
def webhooks_remove(subscription_id: int) -> None:
    """Remove a subscription; its pending deliveries are dropped."""
    with command_runtime().session_scope() as session:
        removed = subscriptions.remove(session, subscription_id)
        shown = removed.url_shown
    click.echo(f"removed webhook {subscription_id} ({shown})")
