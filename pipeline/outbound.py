"""Where certman may send requests on a dealer's behalf: one policy for the pipeline and the edge.

Dealers' sites often live on private addresses behind the platform, so loopback and private
ranges are allowed unless an allow-list narrows them. What is never an upstream, whatever a
dealer's URL or DNS says: the cloud metadata services (a request there hands out the machine's
credentials), "this host" and multicast. Link-local addresses (where most metadata services
live) are refused unless ``CERTMAN_UPSTREAM_ALLOW_LINK_LOCAL`` allows them. IPv6 forms that
carry an IPv4 address (IPv4-mapped, NAT64, 6to4, Teredo, IPv4-compatible) are judged by the
IPv4 address inside as well, so ``::ffff:169.254.169.254`` is no way round.

A hostname is not resolved here: it may resolve elsewhere by the time anyone connects, so
whoever connects checks each address it is about to use with :meth:`OutboundPolicy.check_address`.

Light on purpose (standard library only): the edge imports it.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv6Address,
    ip_address,
    ip_network,
)
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from pipeline.setting_values import Network, parse_networks

if TYPE_CHECKING:
    from pipeline.settings import Settings

__all__ = [
    "METADATA_ADDRESSES",
    "OutboundPolicy",
    "RefusedAddress",
    "RefusedUpstream",
    "hide_password",
    "parse_networks",
    "redact_url",
    "scrub_url",
]

Address = IPv4Address | IPv6Address

# Instance metadata and platform endpoints of the common clouds: refused even when link-local
# addresses or an allow-list would let them through, since no dealer's site is ever there.
METADATA_ADDRESSES: dict[Address, str] = {
    ip_address("169.254.169.254"): "the cloud metadata service (AWS, GCP, Azure, OpenStack, ...)",
    ip_address("169.254.170.2"): "the AWS ECS task metadata service",
    ip_address("169.254.170.23"): "the AWS EKS pod identity agent",
    ip_address("169.254.0.23"): "the Tencent Cloud metadata service",
    ip_address("fd00:ec2::254"): "the AWS instance metadata service (IPv6)",
    ip_address("fd00:ec2::23"): "the AWS EKS pod identity agent (IPv6)",
    ip_address("100.100.100.200"): "the Alibaba Cloud metadata service",
    ip_address("192.0.0.192"): "the Oracle Cloud metadata service",
    ip_address("168.63.129.16"): "the Azure platform endpoint (WireServer)",
}

_THIS_HOST_V4 = ip_network("0.0.0.0/8")  # Linux sends these to the local host
_BROADCAST_V4 = ip_address("255.255.255.255")
_LINK_LOCAL = (ip_network("169.254.0.0/16"), ip_network("fe80::/10"))
_NAT64_WELL_KNOWN = ip_network("64:ff9b::/96")  # RFC 6052
_NAT64_LOCAL = ip_network("64:ff9b:1::/48")  # RFC 8215
_IPV4_COMPATIBLE = ip_network("::/96")  # deprecated, but some stacks still route it

LINK_LOCAL_HINT = "set CERTMAN_UPSTREAM_ALLOW_LINK_LOCAL=on to allow link-local upstreams"


class RefusedAddress(ValueError):
    """An address certman will not connect to on a dealer's behalf; the message says why.

    ``kind``: "metadata", "unspecified", "multicast", "broadcast", "link-local",
    "not-allowed" (outside the allow-list) or "invalid" (not an address at all).
    """

    def __init__(self, address: str, reason: str, kind: str) -> None:
        super().__init__(f"address {address} refused: {reason}")
        self.address = address
        self.reason = reason
        self.kind = kind


class RefusedUpstream(ValueError):
    """An upstream URL that is not acceptable; the message names it (without a password it
    may carry) and says why."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"upstream {hide_password(url)!r}: {reason}")
        self.url = url
        self.reason = reason


def redact_url(url: str) -> str:
    """``url`` as it may appear in a log line or an error: ``scheme://host[:port]/…``.

    Webhook receivers put their secret in the path or the query (Slack's and Teams' hooks are
    bearer tokens in the path), and any URL may carry ``user:password@``: the user info is
    dropped and the path and query become ``…``. What cannot be parsed is not echoed at all.
    """
    text = url.strip()
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (a bad port raises here, not when the netloc is shown)
    except ValueError:
        return "(an unparseable URL)"
    if not parts.scheme or not parts.netloc:
        return "(not a URL)" if text else ""
    shown = f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"
    return shown + ("/…" if parts.path.strip("/") or parts.query or parts.fragment else "")


# Up to the authority's last "@", as urlsplit reads it: a password may hold an unescaped "@".
_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/?#:@]*):[^/?#]*@")


def hide_password(url: str) -> str:
    """``url`` with the password of its ``user:password@`` replaced by ``…``, for a message
    about a URL whose other parts are no secret (an upstream's); parsed or not."""
    return _PASSWORD.sub(r"\1:…@", url)


def scrub_url(text: str, url: str) -> str:
    """``text`` (an exception's message, a receiver's answer) with ``url``, and its path and
    query, whole or apart, decoded or not, replaced by :func:`redact_url`'s form: libraries
    quote the URL they were given in their errors, and servers echo the path they were sent
    ("Cannot POST /hooks/<token>")."""
    redacted = redact_url(url)
    text = text.replace(url, redacted)
    try:
        parts = urlsplit(url)
    except ValueError:
        return text
    secrets = [
        parts.path + (f"?{parts.query}" if parts.query else ""),
        parts.query,
        parts.path,
        unquote(parts.path),
    ]
    if parts.username or parts.password:
        secrets += [parts.netloc.rsplit("@", 1)[0]]
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) > 1:  # a bare "/" gives nothing away and is everywhere
            text = text.replace(secret, "…")
    return text


def _parse_address(ip: str | Address) -> Address:
    if isinstance(ip, IPv4Address | IPv6Address):
        return ip
    text = ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ip_address(text)
    except ValueError:
        raise RefusedAddress(repr(ip), "not an IP address", "invalid") from None


def embedded_ipv4(address: IPv6Address) -> Iterator[tuple[str, IPv4Address]]:
    """The IPv4 addresses an IPv6 address carries, with the name of the form."""
    if address.ipv4_mapped is not None:
        yield "IPv4-mapped", address.ipv4_mapped
        return
    packed = address.packed
    if address in _NAT64_WELL_KNOWN:
        yield "NAT64", IPv4Address(packed[12:])
    elif address in _NAT64_LOCAL:
        # RFC 6052 puts the IPv4 address after a /48 prefix around the reserved octet 8, with
        # zeros after it; operators as often use a /96 out of this range, with it last.
        if any(packed[11:]):
            yield "NAT64", IPv4Address(packed[12:])
        else:
            yield "NAT64", IPv4Address(packed[6:8] + packed[9:11])
    elif address in _IPV4_COMPATIBLE and int(address) > 1:
        yield "IPv4-compatible", IPv4Address(packed[12:])
    if address.sixtofour is not None:
        yield "6to4", address.sixtofour
    if address.teredo is not None:
        yield "Teredo", address.teredo[1]


_HOST_CHARACTERS = re.compile(r"^[a-z0-9_.-]+$")


def _host_as_resolved(raw: str, host: str) -> str:
    """A URL's host (not an [IPv6] literal) in the one form its address is judged in: the
    form the resolver is handed, so that no other spelling of a refused address gets through.

    ``169.254.169.254.`` is that address with DNS's root dot; Python's socket module turns
    ``１６９.２５４.１６９.２５４`` (full-width digits) or ``169。254。169。254`` into the plain
    address with its IDNA codec before resolving. So: one trailing dot dropped, a non-ASCII
    host put through the same codec, and then nothing but letters, digits, ``-``, ``_`` and
    non-empty labels (a ``%``-escape in a host is decoded by some clients and not others).
    """
    name = host[:-1] if host.endswith(".") else host
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise RefusedUpstream(raw, f"{host!r} is not a valid host name") from None
    if not _HOST_CHARACTERS.match(name):
        raise RefusedUpstream(
            raw, f"the host {host!r} may hold only letters, digits, '-', '_' and '.'"
        )
    if "" in name.split("."):
        raise RefusedUpstream(raw, f"the host {host!r} has an empty label (two dots in a row)")
    return name


@dataclass(frozen=True)
class OutboundPolicy:
    """Which addresses certman connects to for a dealer (upstreams, self-check fetches).

    ``allowed_networks`` empty: any address not refused outright. Set: only addresses inside
    it, and still never the refused ones.
    """

    allow_link_local: bool = False
    allowed_networks: tuple[Network, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> OutboundPolicy:
        return cls(
            allow_link_local=settings.upstream_allow_link_local,
            allowed_networks=tuple(settings.upstream_allowed_networks),
        )

    # --- addresses -----------------------------------------------------------------------
    def check_address(self, ip: str | Address) -> None:
        """Return if certman may connect to ``ip``, else raise :class:`RefusedAddress`."""
        address = _parse_address(ip)
        if isinstance(address, IPv6Address):
            if address.scope_id is not None:
                # A zone only makes sense on a link-local address; judge the address itself.
                address = IPv6Address(str(address).split("%", 1)[0])
            embedded = list(embedded_ipv4(address))
            if embedded and embedded[0][0] == "IPv4-mapped":
                # The kernel connects to the IPv4 address itself: judge it as that address.
                form, inner = embedded[0]
                refusal = self._refusal(inner)
                if refusal is None and self._outside_allowed(address) is not None:
                    refusal = self._outside_allowed(inner)
                if refusal is not None:
                    raise RefusedAddress(str(address), f"{form} {inner}: {refusal[1]}", refusal[0])
                return
            for form, inner in embedded:
                refusal = self._refusal(inner)
                if refusal is not None:
                    raise RefusedAddress(str(address), f"{form} {inner}: {refusal[1]}", refusal[0])
        refusal = self._refusal(address)
        if refusal is None:
            refusal = self._outside_allowed(address)
        if refusal is not None:
            raise RefusedAddress(str(address), refusal[1], refusal[0])

    def _refusal(self, address: Address) -> tuple[str, str] | None:
        """(kind, reason) when ``address`` is refused whatever the allow-list says, else None."""
        if address in METADATA_ADDRESSES:
            return "metadata", METADATA_ADDRESSES[address]
        if address.is_unspecified or (
            isinstance(address, IPv4Address) and address in _THIS_HOST_V4
        ):
            return "unspecified", "an unspecified address (this host)"
        if address.is_multicast:
            return "multicast", "a multicast address"
        if address == _BROADCAST_V4:
            return "broadcast", "the broadcast address"
        if address.is_link_local and not self.allow_link_local:
            network = _LINK_LOCAL[0] if isinstance(address, IPv4Address) else _LINK_LOCAL[1]
            return "link-local", f"link-local ({network}), where cloud metadata services live"
        return None

    def _outside_allowed(self, address: Address) -> tuple[str, str] | None:
        if not self.allowed_networks or any(address in n for n in self.allowed_networks):
            return None
        shown = ", ".join(str(n) for n in self.allowed_networks)
        return "not-allowed", f"outside CERTMAN_UPSTREAM_ALLOWED_NETWORKS ({shown})"

    # --- URLs ----------------------------------------------------------------------------
    def check_upstream_url(self, raw: str) -> str:
        """The upstream URL normalised (scheme and host in lower case, no trailing slash), or
        :class:`RefusedUpstream` saying what is wrong with it.

        An IP literal host is checked here; a hostname is checked at connect time by whoever
        connects, against the addresses it resolves to then.
        """
        url = raw.strip()
        if not url:
            raise RefusedUpstream(raw, "is empty")
        if any(c.isspace() or not c.isprintable() for c in url):
            raise RefusedUpstream(raw, "must not contain spaces or control characters")
        if "\\" in url:
            # Browsers and some clients read a backslash as a slash: the host is ambiguous.
            raise RefusedUpstream(raw, "must not contain a backslash")
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # an unbalanced or invalid [IPv6] host
            raise RefusedUpstream(raw, f"is not a valid URL ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RefusedUpstream(raw, "must be an http:// or https:// URL with a host")
        if "@" in parts.netloc:
            raise RefusedUpstream(
                raw,
                "must not contain a user name or password (user:pass@): they would be sent "
                "to the site with every request; configure the upstream to need none",
            )
        if not parts.hostname:
            raise RefusedUpstream(raw, "must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment or url.endswith(("?", "#")):
            raise RefusedUpstream(raw, "must not have a query or fragment")
        try:
            port = parts.port
        except ValueError:
            raise RefusedUpstream(raw, "the port must be a number from 1 to 65535") from None
        if port is not None and not 1 <= port <= 65535:
            raise RefusedUpstream(raw, "the port must be a number from 1 to 65535")
        bracketed = "[" in parts.netloc
        host = parts.hostname  # lower case, brackets removed
        if not bracketed:
            host = _host_as_resolved(raw, host)
        literal = self._ip_literal(raw, host, bracketed=bracketed)
        if literal is not None:
            try:
                self.check_address(literal)
            except RefusedAddress as exc:
                hint = f"; {LINK_LOCAL_HINT}" if exc.kind == "link-local" else ""
                raise RefusedUpstream(raw, f"{exc}{hint}") from None
            host = f"[{literal}]" if isinstance(literal, IPv6Address) else str(literal)
        netloc = host if port is None else f"{host}:{port}"
        return f"{parts.scheme}://{netloc}{parts.path}".rstrip("/")

    @staticmethod
    def _ip_literal(raw: str, host: str, *, bracketed: bool) -> Address | None:
        """The host as an address when it is one, else None for a hostname."""
        if bracketed:
            try:
                address = ip_address(host.split("%", 1)[0])
            except ValueError:
                raise RefusedUpstream(raw, f"[{host}] is not an IPv6 address") from None
            if not isinstance(address, IPv6Address):
                raise RefusedUpstream(raw, f"[{host}] is not an IPv6 address")
            if "%" in host:
                # A zone is only meaningful on this machine's own links; an upstream has none.
                raise RefusedUpstream(raw, "must not name an IPv6 zone (%)")
            return address
        try:
            return IPv4Address(host)
        except ValueError:
            pass
        try:
            # getaddrinfo reads "2852039166", "0xa9.254.169.254" or "127.1" as addresses:
            # a host written so must be refused here, or it would pass as a hostname.
            packed = socket.inet_aton(host)
        except OSError:
            return None
        raise RefusedUpstream(
            raw,
            f"{host!r} is an IPv4 address ({IPv4Address(packed)}) in a non-standard form; "
            "write it as four decimal numbers",
        )
