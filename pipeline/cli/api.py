"""``certman api``: the platform's HTTP API (serve) and its bearer tokens."""

from __future__ import annotations

import click

from pipeline.api.clients import Network, parse_network
from pipeline.cli.common import _Group, _print_json, command_runtime
from pipeline.cli.webhooks import webhooks


@click.group(cls=_Group)
def api() -> None:
    """The HTTP API for the platform: serve it, and manage its tokens (docs/api.md)."""


def _networks(
    _ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[Network, ...]:
    try:
        return tuple(parse_network(value) for value in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


@api.command("serve")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to listen on: loopback unless a load balancer on another host "
              "reaches it.")  # fmt: skip
@click.option("--port", type=click.IntRange(1, 65535), default=8470, show_default=True)
@click.option("--processes", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Processes sharing the port (stateless: any number, on any host).")  # fmt: skip
@click.option("--rate", default="600/1m", show_default=True,
              help="Requests per token, all processes together (N/1s, N/1m…), or off.")  # fmt: skip
@click.option("--max-body", type=click.IntRange(1024, 64 * 1024 * 1024), default=1024 * 1024,
              show_default=True, help="Largest request body, in bytes.")  # fmt: skip
@click.option("--max-batch", type=click.IntRange(1, 10000), default=1000, show_default=True,
              help="Most sites in one POST /v1/sites/batch.")  # fmt: skip
@click.option("--trusted-proxy", "trusted_proxies", multiple=True, metavar="NETWORK",
              callback=_networks,
              help="A proxy or load balancer (address or network) whose X-Forwarded-For names "
              "the client, for the per-address limit on failed authentications. Repeat for "
              "several. Without it the peer's address is used, the header ignored.")  # fmt: skip
def serve(
    address: str,
    port: int,
    processes: int,
    rate: str,
    max_body: int,
    max_batch: int,
    trusted_proxies: tuple[Network, ...],
) -> None:
    """Serve the API on http://ADDRESS:PORT (put TLS in front: a load balancer, the edge)."""
    import logging

    from pipeline.api.app import ApiConfig
    from pipeline.api.app import serve as run
    from pipeline.runtime import Runtime
    from pipeline.setting_values import parse_rate
    from pipeline.settings import get_settings

    settings = get_settings()
    config = ApiConfig(
        rate=None if rate == "off" else parse_rate(rate),
        max_body=max_body,
        max_batch=max_batch,
        trusted_proxies=trusted_proxies,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    click.echo(f"certman api on http://{address}:{port} ({processes} processes)")
    run(lambda: Runtime(settings), address=address, port=port, processes=processes,
        config=config)  # fmt: skip


@api.group(cls=_Group)
def tokens() -> None:
    """Bearer tokens: made once and shown once, stored only as a hash."""


@tokens.command("create")
@click.option("--name", required=True, help="What the token is for; recorded in site history.")
@click.option("--scope", "scopes", multiple=True, required=True,
              type=click.Choice(["sites:read", "sites:write", "sites:operate"]),
              help="sites:read, sites:write (add, update, remove, batch), sites:operate "
              "(renew, revoke). Repeat for several.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True)
def tokens_create(name: str, scopes: tuple[str, ...], as_json: bool) -> None:
    """Make a token and print it: this is the only time it is shown."""
    from pipeline.api.tokens import create_token

    process = command_runtime()
    with process.session_scope() as session:
        token = create_token(session, name, list(scopes))
    if as_json:
        _print_json({"name": name, "scopes": list(scopes), "token": token})
        return
    click.echo(token)
    click.echo(f"token {name} made; it is shown only this once", err=True)


@tokens.command("list")
@click.option("--json", "as_json", is_flag=True)
def tokens_list(as_json: bool) -> None:
    """Every token: name, scopes, created, last used (to the minute), revoked."""
    from pipeline.api.tokens import list_tokens

    process = command_runtime()
    with process.session_scope() as session:
        rows = list_tokens(session)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        click.echo("no tokens")
        return
    click.echo(f"{'NAME':24}  {'SCOPES':40}  {'LAST USED':25}  REVOKED")
    for row in rows:
        click.echo(f"{row['name']:24}  {' '.join(row['scopes']):40}  "
                   f"{row['last_used_at'] or '-':25}  {row['revoked_at'] or '-'}")  # fmt: skip


@tokens.command("revoke")
@click.argument("name")
def tokens_revoke(name: str) -> None:
    """Revoke a token: refused from its next request on."""
    from pipeline.api.tokens import revoke_token

    process = command_runtime()
    with process.session_scope() as session:
        done = revoke_token(session, name)
    click.echo(f"token {name} revoked" if done else f"token {name} was already revoked")


api.add_command(webhooks)
