"""Fetch a challenge the way the CA will before answering it (as cert-manager does).

A dealer who has not yet pointed DNS at us must never burn the CA's failed-validation limit.
"""

from __future__ import annotations

import http.client
import socket
from dataclasses import dataclass

import dns.exception
import dns.resolver

from pipeline.distribution.layout import EDGE_HEADER
from pipeline.outbound import OutboundPolicy, RefusedAddress

# What the self-check refuses to fetch from: the metadata services, link-local, "this host",
# multicast. No allow-list: that is for upstreams, and the edges a name must reach are not
# upstreams. Loopback stays allowed, so that it works on one machine.
SELF_CHECK_POLICY = OutboundPolicy()


def resolve(name: str, resolver: str | None, *, ipv6: bool = False) -> list[str]:
    """A name's IPv4 (or IPv6) addresses, through ``host:port`` when given, else the system's
    resolver."""
    if resolver:
        host, _, port = resolver.rpartition(":")
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [host]
        r.port = int(port)
        r.lifetime = 5
        try:
            return [a.to_text() for a in r.resolve(name, "AAAA" if ipv6 else "A")]
        except dns.exception.DNSException:
            return []
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    try:
        infos = socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)
    except OSError:
        return []
    return sorted({str(info[4][0]) for info in infos})


@dataclass(frozen=True)
class Problem:
    reason: str
    # An edge answered without the token: DNS is right, and the fault is ours (an edge that
    # lost Redis, say), not the dealer's.
    ours: bool = False


class _NoConnection(Exception):
    """Nothing accepted a connection at the address."""


def check(
    name: str,
    token: str,
    expected: str,
    *,
    port: int,
    resolver: str | None,
    policy: OutboundPolicy = SELF_CHECK_POLICY,
) -> Problem | None:
    """None when the challenge comes back as the CA will see it, else the reason it does not.

    Every address is first checked against ``policy``, before anything is fetched: a dealer's
    DNS pointing at 169.254.169.254 must not make a worker fetch from the metadata service,
    so such an address fails the name. Then IPv6 first, as Let's Encrypt does: an address that
    accepts no connection is passed over (the CA falls back to IPv4), but anything else that
    goes wrong there fails. Then every IPv4 address, since the CA may pick any of them.
    (Unlike the CA, it does not skip loopback or private addresses, so that it works on one
    machine.)
    """
    ipv6 = resolve(name, resolver, ipv6=True)
    ipv4 = resolve(name, resolver)
    if not ipv4 and not ipv6:
        return Problem(f"DNS for {name} does not resolve")
    for address in (*ipv6, *ipv4):
        try:
            policy.check_address(address)
        except RefusedAddress as exc:
            return Problem(f"DNS for {name} resolves to {exc.address}, which is never fetched "
                           f"from: {exc.reason}")  # fmt: skip
    connected = False
    for address in ipv6:
        try:
            problem = _fetch(name, address, port, token, expected, connect_timeout=2)
        except _NoConnection:
            continue
        connected = True
        if problem is not None:
            return problem
    for address in ipv4:
        try:
            problem = _fetch(name, address, port, token, expected, connect_timeout=5)
        except _NoConnection as exc:
            return Problem(f"DNS for {name} does not reach the edge ({address}:{port}: {exc})")
        if problem is not None:
            return problem
    if not ipv4 and not connected:
        return Problem(f"DNS for {name} has only IPv6 addresses, and none answered from here")
    return None


def _fetch(
    name: str, address: str, port: int, token: str, expected: str, *, connect_timeout: float
) -> Problem | None:
    """Fetch the token from one address; :class:`_NoConnection` when nothing accepts a
    connection there."""
    host = f"[{address}]" if ":" in address else address  # as the reasons show it
    connection = http.client.HTTPConnection(address, port, timeout=connect_timeout)
    try:
        try:
            connection.connect()
        except OSError as exc:
            raise _NoConnection(str(exc)) from exc
        connection.sock.settimeout(5)
        try:
            connection.request(
                "GET",
                f"/.well-known/acme-challenge/{token}",
                headers={"Host": name, "User-Agent": "certman"},
            )
            response = connection.getresponse()
            body = response.read(4096).decode("ascii", "replace").strip()
        except (OSError, http.client.HTTPException) as exc:
            return Problem(
                f"DNS for {name} does not reach the edge ({host}:{port} accepted the "
                f"connection, then: {exc!r})"
            )
    finally:
        connection.close()
    if response.status == 200 and body == expected:
        return None
    if response.getheader(EDGE_HEADER):
        return Problem(
            f"the edge at {host}:{port} answered {response.status} for {name} "
            "without the challenge (is it connected to Redis?)",
            ours=True,
        )
    return Problem(
        f"DNS for {name} does not reach the edge "
        f"({host}:{port} answered {response.status} without the key authorization)"
    )
