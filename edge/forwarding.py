"""The forwarding headers an upstream receives: who the client is, over what, for which host.

The edge is normally the first hop, so whatever a client says about its own address is a lie
to be dropped: ``Forwarded``, the ``X-Forwarded-*`` family, ``X-Real-IP``, ``Client-IP``,
``X-Originating-IP``, ``X-Original-URL`` and the like, from the one list :data:`CLIENT_CLAIMS`
(also spelt with underscores, which some frameworks read as dashes). Only a peer listed as a
trusted proxy (an HTTP load balancer in front of the edge) keeps its forwarding headers, and
the edge appends its own hop to them. An L4 load balancer hands over the client's address with
the PROXY protocol instead (:mod:`edge.proxy_protocol`): the address that header carries is the
peer here.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

from tornado.httputil import HTTPHeaders

__all__ = [
    "CLIENT_CLAIMS",
    "TrustedProxies",
    "forwarding_fields",
    "forwarding_headers",
    "is_client_claim",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The one list of client-IP (and client-routing) claims: lower case, dashes; compare with
# is_client_claim(), which folds underscores too (``X_Forwarded_For``, ``Client_IP``). Frameworks
# and WAFs read each of these as the client's address, scheme, host or path.
CLIENT_CLAIMS = frozenset(
    {
        "forwarded",
        "forwarded-for",
        "forwarded-host",
        "forwarded-proto",
        "x-forwarded",
        "x-forwarded-for",
        "x-forwarded-for-original",
        "x-forwarded-proto",
        "x-forwarded-protocol",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-forwarded-scheme",
        "x-forwarded-ssl",
        "x-forwarded-by",
        "x-original-forwarded-for",
        "x-original-host",
        "x-original-url",
        "x-original-uri",
        "x-rewrite-url",
        "x-real-ip",
        "x-remote-ip",
        "x-remote-addr",
        "x-originating-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "x-proxyuser-ip",
        "x-host",
        "x-http-host-override",
        "x-url-scheme",
        "x-scheme",
        "front-end-https",
        "client-ip",
        "true-client-ip",
        "cf-connecting-ip",
        "cf-connecting-ipv6",
        "fastly-client-ip",
        "akamai-client-ip",
        "x-azure-clientip",
        "x-appengine-user-ip",
        "wl-proxy-client-ip",
        "proxy-client-ip",
    }
)


def is_client_claim(name: str) -> bool:
    return name.lower().replace("_", "-") in CLIENT_CLAIMS


class TrustedProxies:
    """Peers whose forwarding headers are believed: addresses or networks."""

    def __init__(self, networks: Iterable[str | IPNetwork] = ()) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(
            n if not isinstance(n, str) else ipaddress.ip_network(n.strip(), strict=False)
            for n in networks
        )

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, peer: str | None) -> bool:
        if not self.networks or not peer:
            return False
        try:
            ip = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)


@functools.lru_cache(maxsize=4096)
def _node(address: str) -> str:
    """An RFC 7239 node: IPv6 in brackets and quotes; anything else quoted when it must be."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return '"unknown"' if not address else f'"{_escape(address)}"'
    return f'"[{ip}]"' if ip.version == 6 else str(ip)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def forwarding_headers(
    headers: HTTPHeaders,
    *,
    peer: str,
    scheme: str,
    host: str,
    trusted: bool,
) -> None:
    """Set the forwarding headers in ``headers`` (the upstream request's, already copied from
    the client's without hop-by-hop fields) for a request from ``peer`` over ``scheme`` to
    ``host``. Untrusted: every client claim removed, then set from what the edge saw.
    Trusted: the claims kept and this hop appended."""
    if not trusted:
        for name in {n for n in headers if is_client_claim(n)}:
            del headers[name]
    this_hop = f'for={_node(peer)};host="{_escape(host)}";proto={scheme}'
    prior_for = ", ".join(headers.get_list("X-Forwarded-For")) if trusted else ""
    prior_forwarded = ", ".join(headers.get_list("Forwarded")) if trusted else ""
    headers["X-Forwarded-For"] = f"{prior_for}, {peer}" if prior_for else peer
    headers["Forwarded"] = f"{prior_forwarded}, {this_hop}" if prior_forwarded else this_hop
    if "X-Forwarded-Proto" not in headers:
        headers["X-Forwarded-Proto"] = scheme
    if "X-Forwarded-Host" not in headers:
        headers["X-Forwarded-Host"] = host


def forwarding_fields(
    fields: list[tuple[str, str]],
    *,
    peer: str,
    scheme: str,
    host: str,
    trusted: bool,
    skip: frozenset[str] = frozenset(),
) -> list[tuple[str, str]]:
    """:func:`forwarding_headers` on a list of ``(name, value)`` field lines (the proxy core's
    form, with no header object per request): the fields to send, claims dropped or kept, and
    this hop's fields appended. Fields named (in lower case) in ``skip`` are dropped too, in
    the same pass."""
    prior_for: list[str] = []
    prior_forwarded: list[str] = []
    out: list[tuple[str, str]] = []
    has_proto = has_host = False
    for name, value in fields:
        lower = name.lower()
        if lower in skip:
            continue
        if lower == "x-forwarded-for":
            if trusted:
                prior_for.append(value)
            continue
        if lower == "forwarded":
            if trusted:
                prior_forwarded.append(value)
            continue
        if not trusted and lower.replace("_", "-") in CLIENT_CLAIMS:
            continue
        has_proto = has_proto or lower == "x-forwarded-proto"
        has_host = has_host or lower == "x-forwarded-host"
        out.append((name, value))
    this_hop = f'for={_node(peer)};host="{_escape(host)}";proto={scheme}'
    joined_for = ", ".join(prior_for)
    joined_forwarded = ", ".join(prior_forwarded)
    out.append(("X-Forwarded-For", f"{joined_for}, {peer}" if joined_for else peer))
    out.append(("Forwarded", f"{joined_forwarded}, {this_hop}" if joined_forwarded else this_hop))
    if not has_proto:
        out.append(("X-Forwarded-Proto", scheme))
    if not has_host:
        out.append(("X-Forwarded-Host", host))
    return out
