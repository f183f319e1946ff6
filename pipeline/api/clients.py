"""Which address a request comes from, for the per-address limit on failed authentications.

The peer's address, unless the peer is a proxy the operator trusts (``certman api serve
--trusted-proxy``): then the ``X-Forwarded-For`` entries are read from the right, each one added
by the proxy to its right, and the first that is not itself a trusted proxy is the client.
Anything to the left of it was written by the client and proves nothing. Tornado's own
``xheaders`` believes the header from any peer, so a client could name a new address for each
bad token and never reach the limit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

Network = IPv4Network | IPv6Network


def parse_network(text: str) -> Network:
    """``10.0.0.0/8``, ``2001:db8::/32`` or one address; ValueError naming the text otherwise."""
    try:
        return ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"not an IP address or network: {text!r}") from None


def _address(text: str) -> IPv4Address | IPv6Address | None:
    try:
        address = ip_address(text.strip())
    except ValueError:
        return None
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_address(
    peer: str | None, forwarded_for: Iterable[str], trusted: Sequence[Network]
) -> str:
    """The client's address (see the module's docstring); "unknown" without a peer."""
    current = _address(peer) if peer else None
    if current is None:
        return peer or "unknown"
    hops = [hop for header in forwarded_for for hop in header.split(",")]
    while any(current in network for network in trusted) and hops:
        previous = _address(hops.pop())
        if previous is None:
            break  # garbage where a proxy's entry should be: stop at the last one trusted
        current = previous
    return str(current)
