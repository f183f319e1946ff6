"""Fair shares of the upstream concurrency: per site, per client address, and in total.

Every site shares one pool of upstream requests. Without shares, one client holding many
requests open against one slow site (or sending bodies that never finish) takes the whole pool,
and every other site's requests wait and time out. So a request needs a slot from three
budgets before it goes upstream:

- its **site's** share (``per_site``): a slow or hanging upstream fills its own share only;
- its **client's** share (``per_client``, by IPv4 address or IPv6 /64): one client, whatever
  sites it picks, holds at most this many;
- the **total** (``total``): what the upstream client may have in flight at once.

A full site or client share is answered at once (503 with ``Retry-After``): waiting would only
let that site or client queue up more. When only the total is full, a request waits in a
bounded queue (``queue``, first come first served among those whose shares have room) for at
most ``queue_timeout`` seconds, so a burst across many sites is smoothed, not refused.

Pure bookkeeping on one event loop (no locks, no I/O): any data path can use it.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from collections import deque
from dataclasses import dataclass

__all__ = ["Full", "ShareLimits", "Shares", "Ticket", "client_key"]


@dataclass(frozen=True)
class ShareLimits:
    total: int = 1000
    per_site: int = 100
    per_client: int = 32
    queue: int = 256
    queue_timeout: float = 2.0


class Full(Exception):
    """No slot: ``reason`` is "site", "client", "total" or "queue" (the wait queue is full)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class Ticket:
    """One slot, held until :meth:`Shares.release` (which a second time does nothing)."""

    site: str
    client: str
    released: bool = False


# Asked once per request for a handful of busy clients: parsing the address each time was a
# measurable part of a proxied request's CPU.
@functools.lru_cache(maxsize=4096)
def client_key(address: str) -> str:
    """The client a share is counted for: its IPv4 address, or its IPv6 /64 (one host hands
    itself as many addresses of its /64 as it likes)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class Shares:
    def __init__(self, limits: ShareLimits) -> None:
        self.limits = limits
        self.in_use = 0
        self._sites: dict[str, int] = {}
        self._clients: dict[str, int] = {}
        self._waiting: deque[tuple[str, str, asyncio.Future[Ticket]]] = deque()

    def waiting(self) -> int:
        return len(self._waiting)

    def _refusal(self, site: str, client: str) -> str | None:
        if self._sites.get(site, 0) >= self.limits.per_site:
            return "site"
        if self._clients.get(client, 0) >= self.limits.per_client:
            return "client"
        return None

    def _grant(self, site: str, client: str) -> Ticket:
        self.in_use += 1
        self._sites[site] = self._sites.get(site, 0) + 1
        self._clients[client] = self._clients.get(client, 0) + 1
        return Ticket(site, client)

    def try_acquire(self, site: str, client: str) -> Ticket:
        """A slot now, or :class:`Full` ("total" means: :meth:`acquire` may wait for one)."""
        refusal = self._refusal(site, client)
        if refusal is not None:
            raise Full(refusal)
        if self.in_use >= self.limits.total:
            raise Full("total")
        return self._grant(site, client)

    async def acquire(self, site: str, client: str) -> Ticket:
        """A slot, waiting in the bounded queue while only the total is full."""
        try:
            return self.try_acquire(site, client)
        except Full as exc:
            if exc.reason != "total":
                raise
        if len(self._waiting) >= self.limits.queue:
            raise Full("queue")
        future: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        entry = (site, client, future)
        self._waiting.append(entry)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.limits.queue_timeout)
        except BaseException as exc:
            if future.done():
                ticket = future.result()
                if isinstance(exc, TimeoutError):
                    return ticket  # granted as the time ran out
                self.release(ticket)  # granted, but the request is gone (cancelled)
                raise
            future.cancel()
            self._waiting.remove(entry)
            if isinstance(exc, TimeoutError):
                raise Full("total") from None
            raise

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self.in_use -= 1
        for counts, key in ((self._sites, ticket.site), (self._clients, ticket.client)):
            left = counts[key] - 1
            if left:
                counts[key] = left
            else:
                del counts[key]
        self._wake()

    def _wake(self) -> None:
        """Hand freed slots to the first waiters whose own shares have room."""
        if not self._waiting:
            return
        for entry in list(self._waiting):
            if self.in_use >= self.limits.total:
                return
            site, client, future = entry
            if future.done() or self._refusal(site, client) is not None:
                continue
            self._waiting.remove(entry)
            future.set_result(self._grant(site, client))
