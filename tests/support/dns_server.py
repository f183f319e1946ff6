"""A tiny authoritative DNS server on 127.0.0.1 (UDP), answering A and AAAA from a table.

For tests that need a name to resolve somewhere it must not (a dealer's DNS pointing at the
metadata address) without touching the machine's resolver configuration.
"""

from __future__ import annotations

import select
import socket
import threading
from types import TracebackType

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class DnsServer:
    """``records``: name -> (A addresses, AAAA addresses). Other names get NXDOMAIN."""

    def __init__(self, records: dict[str, tuple[list[str], list[str]]]) -> None:
        self.records = {name.rstrip(".").lower(): value for name, value in records.items()}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.queries: list[tuple[str, str]] = []

    @property
    def address(self) -> str:
        """As CERTMAN_DNS_RESOLVER takes it."""
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            # Wakes up now and then to see whether it should stop.
            ready, _, _ = select.select([self.sock], [], [], 0.1)
            if not ready:
                continue
            data, peer = self.sock.recvfrom(4096)
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            self.sock.sendto(self._answer(query).to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        kind = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, kind))
        if name not in self.records:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        v4, v6 = self.records[name]
        addresses = v4 if kind == "A" else v6 if kind == "AAAA" else []
        if addresses:
            response.answer.append(
                dns.rrset.from_text_list(question.name, 60, dns.rdataclass.IN, kind, addresses)
            )
        return response
