"""One POST to a receiver, under the outbound policy: no redirect, no refused address.

The host is resolved here, every address it resolves to is checked against the policy
(:meth:`pipeline.outbound.OutboundPolicy.check_address`: never the cloud metadata services,
link-local, "this host" or multicast), and the connection is made to an address so checked,
so that DNS answering differently at connect time is no way round (TLS still verifies the
host name). A redirect is not followed: it is an answer like any other non-2xx.

The URL is a secret (receivers put tokens in its path or query): errors show it as
:func:`pipeline.outbound.redact_url` does.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from pipeline.outbound import OutboundPolicy, RefusedAddress, RefusedUpstream, redact_url

# Receivers are expected to answer at once and do their work later (Standard Webhooks); what
# takes longer counts as a failed attempt and is tried again.
TIMEOUT = 10.0
# The answer's body is read only this far, for the error shown when it is not a 2xx.
BODY_SHOWN = 200

# The self-check's policy: the platform's receiver may well be on a private network or this
# host, so those stay allowed; no allow-list of upstreams applies (it is no upstream).
WEBHOOK_POLICY = OutboundPolicy()


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


def check_url(raw: str, policy: OutboundPolicy = WEBHOOK_POLICY) -> str:
    """``raw`` stripped, or ValueError saying what is wrong with it (the URL redacted)."""
    url = raw.strip()
    shown = redact_url(url) or "''"
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
        policy.check_upstream_url(f"{parts.scheme}://{parts.netloc}")
    except RefusedUpstream as exc:
        raise ValueError(f"webhook URL {shown}: {exc.reason}") from None
    return url


class _Pinned(http.client.HTTPConnection):
    """An HTTP connection to ``host`` made to the checked ``address``."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedTLS(_Pinned):
    def __init__(self, host: str, port: int, address: str, timeout: float,
                 context: ssl.SSLContext) -> None:  # fmt: skip
        super().__init__(host, port, address, timeout)
        self._context = context

    def connect(self) -> None:
        super().connect()
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)


def _addresses(host: str, port: int, policy: OutboundPolicy, shown: str) -> list[str]:
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
    policy: OutboundPolicy = WEBHOOK_POLICY,
    timeout: float = TIMEOUT,
    tls: ssl.SSLContext | None = None,
) -> Answer:
    """POST ``body`` to ``url``; the answer whatever its status, or :class:`SendFailed`."""
    shown = redact_url(url)
    parts = urlsplit(url)
    host = parts.hostname or ""
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    last: OSError | None = None
    for address in _addresses(host, port, policy, shown):
        connection: _Pinned = (
            _PinnedTLS(host, port, address, timeout, tls or ssl.create_default_context())
            if secure
            else _Pinned(host, port, address, timeout)
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
                body=text.replace(url, shown),
                location=redact_url(location) if location else None,
            )
        finally:
            connection.close()
    raise SendFailed("connection", f"{shown}: no connection ({last})")
