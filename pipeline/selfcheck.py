"""Fetch a challenge the way the CA will before answering it (as cert-manager does).

A dealer who has not yet pointed DNS at us must never burn the CA's failed-validation limit.
"""

from __future__ import annotations

import http.client
import socket
from dataclasses import dataclass

import dns.exception
import dns.resolver

from pipeline.distribution import EDGE_HEADER


def resolve(name: str, resolver: str | None) -> list[str]:
    """IPv4 addresses of a name, through ``host:port`` when given, else the system's resolver."""
    if resolver:
        host, _, port = resolver.rpartition(":")
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [host]
        r.port = int(port)
        r.lifetime = 5
        try:
            return [a.to_text() for a in r.resolve(name, "A")]
        except dns.exception.DNSException:
            return []
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return []
    return sorted({str(info[4][0]) for info in infos})


@dataclass(frozen=True)
class Problem:
    reason: str
    # An edge answered without the token: DNS is right, and the fault is ours (an edge that
    # lost Redis, say), not the dealer's.
    ours: bool = False


def check(
    name: str, token: str, expected: str, *, port: int, resolver: str | None
) -> Problem | None:
    """None when the challenge comes back as the CA will see it, else the reason it does not."""
    addresses = resolve(name, resolver)
    if not addresses:
        return Problem(f"DNS for {name} does not resolve")
    path = f"/.well-known/acme-challenge/{token}"
    for address in addresses:
        connection = http.client.HTTPConnection(address, port, timeout=5)
        try:
            connection.request("GET", path, headers={"Host": name, "User-Agent": "certman"})
            response = connection.getresponse()
            body = response.read(4096).decode("ascii", "replace").strip()
        except OSError as exc:
            return Problem(f"DNS for {name} does not reach the edge ({address}:{port}: {exc})")
        finally:
            connection.close()
        if response.status != 200 or body != expected:
            if response.getheader(EDGE_HEADER):
                return Problem(
                    f"the edge at {address}:{port} answered {response.status} for {name} "
                    "without the challenge (is it connected to Redis?)",
                    ours=True,
                )
            return Problem(
                f"DNS for {name} does not reach the edge "
                f"({address}:{port} answered {response.status} without the key authorization)"
            )
    return None
