"""Upstream addresses the edge refuses on top of the outbound policy: itself.

An upstream on loopback, or on one of the edge's own listening addresses, sends the request back
into the edge (or to a local service nobody meant to publish): a site without a certificate
whose upstream resolved to the edge's own :80 turned one request into as many as the pool
holds. The outbound policy (:mod:`pipeline.outbound`) allows loopback, because the pipeline's
self-check and dealers' private networks need it; the edge refuses it unless
``--allow-loopback-upstream`` says so (tests and a demo on one machine). The edge's own listening
addresses are refused even then.

Checked where the connection is made, for every address a name resolves to.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

from pipeline.outbound import RefusedAddress

__all__ = ["SelfReach"]

Address = IPv4Address | IPv6Address

_HINT = "set CERTMAN_EDGE_ALLOW_LOOPBACK_UPSTREAM=on to allow loopback upstreams"


def _plain(address: Address) -> Address:
    if isinstance(address, IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:
            return IPv6Address(str(address).split("%", 1)[0])
    return address


def _is_local(address: Address) -> bool:
    """Whether ``address`` is one of this host's own: only those can be bound."""
    family = socket.AF_INET if isinstance(address, IPv4Address) else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(address), 0))
    except OSError as exc:
        # Only "not an address of this host" says it is not local. Any other failure (EMFILE
        # when the edge is out of descriptors, above all) must not let the connection through.
        return exc.errno != errno.EADDRNOTAVAIL
    return True


@dataclass
class SelfReach:
    """``listening``: the (address, port) pairs the edge accepts on (address "" or an
    unspecified one: every local address)."""

    allow_loopback: bool = False
    listening: set[tuple[str, int]] = field(default_factory=set)

    @classmethod
    def of_sockets(cls, allow_loopback: bool, sockets: Iterable[socket.socket]) -> SelfReach:
        return cls(allow_loopback, {s.getsockname()[:2] for s in sockets})

    def check(self, host: str | Address, port: int) -> None:
        """Raise :class:`RefusedAddress` when connecting to ``host``:``port`` reaches the edge
        itself, or loopback when that is not allowed."""
        address = _plain(ip_address(host) if isinstance(host, str) else host)
        if address.is_loopback and not self.allow_loopback:
            raise RefusedAddress(str(address), f"a loopback address; {_HINT}", "loopback")
        for listen_address, listen_port in self.listening:
            if port != listen_port:
                continue
            bound = _plain(ip_address(listen_address or "0.0.0.0"))
            if bound == address or (bound.is_unspecified and _is_local(address)):
                raise RefusedAddress(
                    f"{address}:{port}", "the edge's own listening address", "self"
                )
