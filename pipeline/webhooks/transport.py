"""One POST to a receiver, under the webhook policy: no redirect, no refused address, a
deadline for the whole attempt.

The host is resolved here, every address it resolves to is checked against the policy
(:class:`WebhookPolicy`: never the cloud metadata services, "this host" or multicast; never
loopback, private, link-local or other internal addresses unless the operator allows their
networks with ``CERTMAN_WEBHOOK_ALLOWED_NETWORKS``), and the connection is made to an address so
checked, so that DNS answering differently at connect time is no way round (TLS still verifies
the host name). A redirect is not followed: it is an answer like any other non-2xx.

An attempt has one deadline (monotonic) from the name's lookup to the answer's last byte read:
each socket operation waits only for the time left, so a receiver trickling a byte every few
seconds fails the attempt at the deadline like one that never answers.

The URL is a secret (receivers put tokens in its path or query): errors and the receiver's
answer show it as :func:`pipeline.outbound.redact_url` does, and its path not at all.
"""

from __future__ import annotations

import http.client
import io
import select
import socket
import ssl
import time
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address
from typing import Any
from urllib.parse import urlsplit

from pipeline.outbound import (
    Address,
    OutboundPolicy,
    RefusedAddress,
    RefusedUpstream,
    embedded_ipv4,
    redact_url,
    scrub_url,
)
from pipeline.setting_values import Network

# Receivers are expected to answer at once and do their work later (Standard Webhooks); an
# attempt that takes longer in all counts as a failed one and is tried again.
TIMEOUT = 10.0
# The answer's body is read only this far, for the error shown when it is not a 2xx.
BODY_SHOWN = 200

ALLOW_HINT = "set CERTMAN_WEBHOOK_ALLOWED_NETWORKS to allow receivers there"


@dataclass(frozen=True)
class WebhookPolicy:
    """Which addresses a receiver may be at: public ones, and internal ones (loopback,
    private, link-local, shared and other reserved ranges) only inside ``allowed_networks``
    (``CERTMAN_WEBHOOK_ALLOWED_NETWORKS``). The metadata services, "this host" and multicast are
    refused whatever it says (:class:`pipeline.outbound.OutboundPolicy` decides those, and
    judges IPv6 forms carrying an IPv4 address by that address too).

    Not the upstreams' policy: a webhook URL is given by whoever holds the API, and a request
    to an internal service on their behalf is what this refuses by default.
    """

    allowed_networks: tuple[Network, ...] = ()

    def check_address(self, ip: str | Address) -> None:
        """Return if a receiver may be at ``ip``, else raise :class:`RefusedAddress`."""
        address = ip_address(ip) if isinstance(ip, str) else ip
        if isinstance(address, IPv6Address) and address.scope_id is not None:
            address = IPv6Address(str(address).split("%", 1)[0])
        judged: list[Address] = [address]
        if isinstance(address, IPv6Address):
            judged += [inner for _, inner in embedded_ipv4(address)]
        allowed = any(a in n for a in judged for n in self.allowed_networks)
        OutboundPolicy(allow_link_local=allowed).check_address(address)
        if allowed:
            return
        for candidate in judged:
            if not candidate.is_global:
                raise RefusedAddress(
                    str(address),
                    f"an internal address ({candidate} is loopback, private or reserved); "
                    + ALLOW_HINT,
                    "internal",
                )


# No internal address: what a policy built from no settings allows.
STRICT = WebhookPolicy()


class SendFailed(Exception):
    """The attempt did not get an answer; ``reason`` is a short fixed word for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Answer:
    status: int
    body: str  # the start of it, as text
    location: str | None  # a redirect's target, redacted

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def check_url(raw: str, policy: WebhookPolicy = STRICT) -> str:
    """``raw`` stripped, or ValueError saying what is wrong with it (the URL redacted)."""
    url = raw.strip()
    shown = redact_url(url) or "''"
    if any(c.isspace() or not c.isprintable() for c in url):
        # urlsplit drops tabs and newlines silently: the URL stored would not be the one given.
        raise ValueError(f"webhook URL {shown}: must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError(f"webhook URL {shown}: not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"webhook URL {shown}: must be an http:// or https:// URL with a host")
    if "@" in parts.netloc:
        raise ValueError(
            f"webhook URL {shown}: must not carry a user name or password; the signature "
            "authenticates each request"
        )
    if parts.fragment or url.endswith("#"):
        raise ValueError(f"webhook URL {shown}: must not have a fragment")
    # The host and port as upstream URLs are judged (odd IPv4 spellings, refused literals):
    # without the path and query, which the upstream rules do not allow and a receiver may use.
    try:
        # Link-local is this policy's to judge (below); metadata addresses stay refused.
        OutboundPolicy(allow_link_local=True).check_upstream_url(f"{parts.scheme}://{parts.netloc}")
        literal = _literal(parts.hostname or "")
        if literal is not None:
            policy.check_address(literal)
    except RefusedUpstream as exc:
        raise ValueError(f"webhook URL {shown}: {exc.reason}") from None
    except RefusedAddress as exc:
        raise ValueError(f"webhook URL {shown}: {exc}") from None
    return url


def _literal(host: str) -> Address | None:
    try:
        return ip_address(host.split("%", 1)[0])
    except ValueError:
        return None  # a name: its addresses are checked at each attempt


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left, or TimeoutError when none are."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, each waiting only for the attempt's time left."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        super().__init__()
        self._sock = sock
        # The socket's own file: it keeps the descriptor open until the answer is read, even
        # after http.client closes the connection (as it does for "Connection: close").
        self._file = sock.makefile("rb", buffering=0)
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        self._sock.settimeout(self._deadline.left())
        return self._file.readinto(buffer)

    def close(self) -> None:
        self._file.close()
        super().close()


class _DeadlineSocket:
    """What http.client uses of a socket, under the attempt's deadline."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self._sock = sock
        self._deadline = deadline

    def sendall(self, data: Any) -> None:
        self._sock.settimeout(self._deadline.left())  # sendall's timeout is for all of it
        self._sock.sendall(data)

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))

    def close(self) -> None:
        self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _Pinned(http.client.HTTPConnection):
    """An HTTP connection to ``host`` made to the checked ``address``, every step of it within
    ``deadline``."""

    def __init__(self, host: str, port: int, address: str, deadline: _Deadline) -> None:
        super().__init__(host, port, timeout=deadline.seconds)
        self._address = address
        self._deadline = deadline

    def _raw(self) -> socket.socket:
        return socket.create_connection((self._address, self.port), self._deadline.left())

    def connect(self) -> None:
        self.sock = _DeadlineSocket(self._raw(), self._deadline)


class _PinnedTLS(_Pinned):
    def __init__(self, host: str, port: int, address: str, deadline: _Deadline,
                 context: ssl.SSLContext) -> None:  # fmt: skip
        super().__init__(host, port, address, deadline)
        self._context = context

    def connect(self) -> None:
        raw = self._raw()
        try:
            tls = self._context.wrap_socket(
                raw, server_hostname=self.host, do_handshake_on_connect=False
            )
        except BaseException:
            raw.close()
            raise
        try:
            self._handshake(tls)
        except BaseException:
            tls.close()  # it has taken over the raw socket's descriptor
            raise
        self.sock = _DeadlineSocket(tls, self._deadline)

    def _handshake(self, tls: ssl.SSLSocket) -> None:
        # Non-blocking, so that the whole handshake (many reads) is bounded by the deadline.
        tls.setblocking(False)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                ready = select.select([tls], [], [], self._deadline.left())[0]
            except ssl.SSLWantWriteError:
                ready = select.select([], [tls], [], self._deadline.left())[1]
            if not ready:
                raise TimeoutError
        tls.setblocking(True)


def _addresses(host: str, port: int, policy: WebhookPolicy, shown: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise SendFailed("dns", f"{shown}: {host} does not resolve ({exc})") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        try:
            policy.check_address(address)
        except RefusedAddress as exc:
            raise SendFailed("refused_address", f"{shown}: {exc}") from None
    return addresses


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    policy: WebhookPolicy = STRICT,
    timeout: float = TIMEOUT,
    tls: ssl.SSLContext | None = None,
) -> Answer:
    """POST ``body`` to ``url`` within ``timeout`` seconds in all; the answer whatever its
    status, or :class:`SendFailed` (its message without the URL's path or query)."""
    try:
        return _post(url, body, headers, policy=policy, deadline=_Deadline(timeout), tls=tls)
    except SendFailed as exc:
        raise SendFailed(exc.reason, scrub_url(str(exc), url)) from None


def _post(url: str, body: bytes, headers: dict[str, str], *, policy: WebhookPolicy,
          deadline: _Deadline, tls: ssl.SSLContext | None) -> Answer:  # fmt: skip
    shown = redact_url(url)
    timeout = deadline.seconds
    parts = urlsplit(url)
    host = parts.hostname or ""
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    last: OSError | None = None
    for address in _addresses(host, port, policy, shown):
        connection: _Pinned = (
            _PinnedTLS(host, port, address, deadline, tls or ssl.create_default_context())
            if secure
            else _Pinned(host, port, address, deadline)
        )
        try:
            try:
                connection.connect()
            except ssl.SSLError as exc:
                raise SendFailed("tls", f"{shown}: TLS: {exc.reason or exc}") from None
            except TimeoutError:
                raise SendFailed("timeout", f"{shown}: no connection in {timeout:g} s") from None
            except OSError as exc:
                last = exc
                continue  # the next address, as a browser would
            try:
                connection.request(
                    "POST",
                    target,
                    body=body,
                    headers={
                        **headers,
                        "Content-Type": "application/json",
                        "User-Agent": "certman-webhooks",
                    },
                )
                response = connection.getresponse()
                text = response.read(BODY_SHOWN).decode("utf-8", "replace")
            except TimeoutError:
                raise SendFailed("timeout", f"{shown}: no answer in {timeout:g} s") from None
            except (OSError, http.client.HTTPException) as exc:
                raise SendFailed("connection", f"{shown}: {type(exc).__name__}: {exc}") from None
            location = response.getheader("Location")
            return Answer(
                status=response.status,
                body=scrub_url(text, url),
                location=redact_url(location) if location else None,
            )
        finally:
            connection.close()
    raise SendFailed("connection", f"{shown}: no connection ({last})")
