"""The outbound policy: which addresses and upstream URLs certman connects to for a dealer.

Nothing here connects anywhere: a refusal happens before any socket is opened, which the
loopback guard checks (it fails any connect beyond 127.0.0.0/8 and ::1).
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_network

import pytest

from pipeline.fleet.alerts import WebhookRefused, WebhookUnavailable, post_webhook
from pipeline.outbound import (
    OutboundPolicy,
    RefusedAddress,
    RefusedUpstream,
    parse_networks,
    redact_url,
    scrub_url,
)
from pipeline.settings import Settings
from tests.support.http_servers import running
from tests.support.loopback_only import loopback_only

DEFAULT = OutboundPolicy()


@pytest.fixture(autouse=True)
def _nothing_leaves_loopback() -> Iterator[None]:
    with loopback_only() as attempts:
        yield
    assert attempts == []


@pytest.mark.parametrize(
    ("address", "kind", "words"),
    [
        ("169.254.169.254", "metadata", "cloud metadata service"),
        ("169.254.170.2", "metadata", "ECS"),
        ("fd00:ec2::254", "metadata", "AWS instance metadata service (IPv6)"),
        ("100.100.100.200", "metadata", "Alibaba"),
        ("::ffff:169.254.169.254", "metadata", "IPv4-mapped 169.254.169.254"),
        ("::ffff:a9fe:a9fe", "metadata", "IPv4-mapped 169.254.169.254"),
        ("64:ff9b::169.254.169.254", "metadata", "NAT64 169.254.169.254"),
        ("64:ff9b:1::a9fe:a9fe", "metadata", "NAT64 169.254.169.254"),
        ("64:ff9b:1:a9fe:a9:fe00::", "metadata", "NAT64 169.254.169.254"),
        ("64:ff9b::100.100.100.200", "metadata", "NAT64 100.100.100.200"),
        ("2002:a9fe:a9fe::1", "metadata", "6to4 169.254.169.254"),
        ("::169.254.169.254", "metadata", "IPv4-compatible 169.254.169.254"),
        ("169.254.1.1", "link-local", "link-local (169.254.0.0/16)"),
        ("fe80::1", "link-local", "link-local (fe80::/10)"),
        ("fe80::1%eth0", "link-local", "link-local"),
        ("::ffff:169.254.1.1", "link-local", "IPv4-mapped 169.254.1.1"),
        ("64:ff9b::169.254.1.1", "link-local", "NAT64 169.254.1.1"),
        ("0.0.0.0", "unspecified", "unspecified"),
        ("0.1.2.3", "unspecified", "unspecified"),
        ("::", "unspecified", "unspecified"),
        ("::ffff:0.0.0.0", "unspecified", "IPv4-mapped 0.0.0.0"),
        ("224.0.0.1", "multicast", "multicast"),
        ("ff02::1", "multicast", "multicast"),
        ("255.255.255.255", "broadcast", "broadcast"),
    ],
)
def test_refused_addresses_name_the_address_and_why(address: str, kind: str, words: str) -> None:
    with pytest.raises(RefusedAddress) as caught:
        DEFAULT.check_address(address)
    assert caught.value.kind == kind
    assert words in str(caught.value)
    assert str(caught.value).startswith("address ")


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "::1", "10.1.2.3", "172.16.0.5", "192.168.1.10", "fd12:3456::1",
     "100.64.0.1", "203.0.113.7", "2001:db8::1", "::ffff:10.0.0.1", "64:ff9b::203.0.113.7"],
)  # fmt: skip
def test_loopback_private_and_public_addresses_are_allowed_by_default(address: str) -> None:
    DEFAULT.check_address(address)


def test_link_local_may_be_allowed_but_never_the_metadata_addresses() -> None:
    lenient = OutboundPolicy(allow_link_local=True)
    lenient.check_address("169.254.1.1")
    lenient.check_address("fe80::1")
    for metadata in ("169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254"):
        with pytest.raises(RefusedAddress, match="metadata"):
            lenient.check_address(metadata)


def test_an_allow_list_admits_only_its_networks() -> None:
    policy = OutboundPolicy(allowed_networks=parse_networks("10.0.0.0/8, fd00:1::/32"))
    policy.check_address("10.9.8.7")
    policy.check_address("::ffff:10.9.8.7")  # the kernel connects to 10.9.8.7
    policy.check_address("fd00:1::5")
    for outside in ("127.0.0.1", "192.168.1.1", "8.8.8.8", "fd00:2::1", "::1"):
        with pytest.raises(RefusedAddress, match="outside CERTMAN_UPSTREAM_ALLOWED_NETWORKS") as e:
            policy.check_address(outside)
        assert e.value.kind == "not-allowed"


def test_an_allow_list_never_admits_what_is_refused_outright() -> None:
    policy = OutboundPolicy(
        allowed_networks=parse_networks("169.254.0.0/16 100.64.0.0/10 fd00::/8"),
        allow_link_local=True,
    )
    for refused in ("169.254.169.254", "100.100.100.200", "fd00:ec2::254"):
        with pytest.raises(RefusedAddress, match="metadata"):
            policy.check_address(refused)
    policy.check_address("169.254.7.7")


def test_not_an_address_is_refused_clearly() -> None:
    with pytest.raises(RefusedAddress, match="not an IP address") as caught:
        DEFAULT.check_address("metadata.google.internal")
    assert caught.value.kind == "invalid"


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("http://10.1.1.1:8080/", "http://10.1.1.1:8080"),
        (" HTTPS://Dealer-Site.Example.COM/Shop/ ", "https://dealer-site.example.com/Shop"),
        ("http://[FD00::0001]:81/a", "http://[fd00::1]:81/a"),
        ("http://localhost", "http://localhost"),
        ("http://127.0.0.1:3000/", "http://127.0.0.1:3000"),
        # DNS's root dot is dropped, and a host is kept in the form the resolver is handed.
        ("http://dealer.example.com./shop", "http://dealer.example.com/shop"),
        ("http://localhost.:8080", "http://localhost:8080"),
        ("http://Bücher.example/", "http://xn--bcher-kva.example"),
        ("http://app_1.internal:8000", "http://app_1.internal:8000"),
    ],
)
def test_good_upstream_urls_come_back_normalised(raw: str, normalised: str) -> None:
    assert DEFAULT.check_upstream_url(raw) == normalised


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("http://user@dealer.example.com/", "user name or password"),
        ("http://evil.example\\@169.254.169.254/", "backslash"),
        ("ftp://dealer.example.com/", "http:// or https://"),
        ("dealer.example.com", "http:// or https://"),
        ("http:///path", "http:// or https://"),
        ("http://dealer.example.com/?a=1", "query or fragment"),
        ("http://dealer.example.com/#top", "query or fragment"),
        ("http://dealer.example.com:0/", "port must be a number from 1 to 65535"),
        ("http://dealer.example.com:70000/", "port must be a number from 1 to 65535"),
        ("http://dealer.example.com:http/", "port must be a number from 1 to 65535"),
        ("http://dealer example.com/", "spaces or control characters"),
        ("http://169.254.169.254/latest/meta-data", "cloud metadata service"),
        ("http://[::ffff:169.254.169.254]/", "IPv4-mapped 169.254.169.254"),
        ("http://[fd00:ec2::254]/", "AWS instance metadata service"),
        ("http://100.100.100.200/", "Alibaba"),
        ("http://169.254.10.10/", "CERTMAN_UPSTREAM_ALLOW_LINK_LOCAL=on"),
        ("http://[fe80::1%25eth0]/", "IPv6 zone"),
        ("http://0.0.0.0:8080/", "unspecified"),
        ("http://2852039166/", "non-standard form"),
        ("http://0xa9.0xfe.0xa9.0xfe/", "(169.254.169.254) in a non-standard form"),
        ("http://127.1/", "non-standard form"),
        ("http://[not-v6]/", "is not a valid URL"),
        ("http://[::1/", "is not a valid URL"),
        # Other spellings of a refused address: each is that address to the resolver.
        ("http://169.254.169.254./", "cloud metadata service"),
        ("http://169.254.169.254.:80/latest", "cloud metadata service"),
        ("http://100.100.100.200./", "Alibaba"),
        ("http://169.254.169.254../", "empty label"),
        ("http://2852039166./", "(169.254.169.254) in a non-standard form"),
        ("http://0xa9fea9fe./", "(169.254.169.254) in a non-standard form"),
        ("http://0251.0376.0251.0376./", "(169.254.169.254) in a non-standard form"),
        (
            "http://\uff11\uff16\uff19.\uff12\uff15\uff14.\uff11\uff16\uff19.\uff12\uff15\uff14/",
            "cloud metadata service",
        ),
        ("http://169\u3002254\u3002169\u3002254/", "cloud metadata service"),
        ("http://169%2e254%2e169%2e254/", "only letters, digits"),
        ("http://169.254.169.254%00/", "only letters, digits"),
        ("http://[::ffff:169.254.169.254]./", "IPv4-mapped 169.254.169.254"),
    ],
)
def test_bad_upstream_urls_are_refused_with_the_reason(raw: str, words: str) -> None:
    with pytest.raises(RefusedUpstream) as caught:
        DEFAULT.check_upstream_url(raw)
    message = str(caught.value)
    assert message.startswith(f"upstream {raw!r}: ")
    assert words in message


@pytest.mark.parametrize(
    "raw",
    [
        "http://user:secret@dealer.example.com/",
        "http://:secret@10.0.0.1/",
        "http://u:secret@[::1/x",
        "http://u:secret@secret@10.0.0.1/",  # an unescaped "@": the host is after the last
    ],
)
def test_a_refused_upstream_never_repeats_its_password(raw: str) -> None:
    with pytest.raises(RefusedUpstream) as caught:
        DEFAULT.check_upstream_url(raw)
    message = str(caught.value)
    assert "secret" not in message
    shown = raw.split("://")[0] + "://" + raw.split("://")[1].split(":")[0] + ":…@"
    assert message.startswith(f"upstream '{shown}")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.slack.com/services/T0/B0/XXXX", "https://hooks.slack.com/…"),
        (
            "https://user:pw@alerts.example.com:8443/hook?token=XXXX",
            "https://alerts.example.com:8443/…",
        ),
        ("https://alerts.example.com?token=XXXX", "https://alerts.example.com/…"),
        ("https://alerts.example.com/", "https://alerts.example.com"),
        ("http://[::1/XXXX", "(an unparseable URL)"),
        ("http://alerts.example.com:99999/XXXX", "(an unparseable URL)"),
        ("alerts.example.com/XXXX", "(not a URL)"),
    ],
)
def test_a_url_is_shown_without_its_secrets(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "XXXX" not in scrub_url(f"failed: {url}", url)


def test_the_allow_list_applies_to_ip_literal_upstreams() -> None:
    policy = OutboundPolicy(allowed_networks=(ip_network("10.0.0.0/8"),))
    assert policy.check_upstream_url("http://10.2.3.4/") == "http://10.2.3.4"
    with pytest.raises(RefusedUpstream, match="outside CERTMAN_UPSTREAM_ALLOWED_NETWORKS"):
        policy.check_upstream_url("http://192.168.0.1/")
    # A hostname is judged where it is connected to, by the addresses it resolves to then.
    assert policy.check_upstream_url("http://dealer.example.com") == "http://dealer.example.com"


def test_networks_parse_with_commas_or_spaces_and_name_a_bad_entry() -> None:
    assert parse_networks("10.0.0.0/8,192.168.0.0/16  fd00::/8, 10.0.0.0/8") == (
        ip_network("10.0.0.0/8"),
        ip_network("192.168.0.0/16"),
        ip_network("fd00::/8"),
    )
    assert parse_networks("203.0.113.9") == (ip_network("203.0.113.9/32"),)
    assert parse_networks("") == ()
    with pytest.raises(ValueError, match=r"'10\.0\.0\.1/8' has host bits set .*10\.0\.0\.0/8"):
        parse_networks("10.0.0.1/8")
    with pytest.raises(ValueError, match="'tenfour' is not a network"):
        parse_networks("10.0.0.0/8 tenfour")


def test_the_policy_comes_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTMAN_UPSTREAM_ALLOW_LINK_LOCAL", "on")
    monkeypatch.setenv("CERTMAN_UPSTREAM_ALLOWED_NETWORKS", "10.0.0.0/8 169.254.0.0/16")
    policy = OutboundPolicy.from_settings(Settings())
    assert policy == OutboundPolicy(
        allow_link_local=True,
        allowed_networks=(ip_network("10.0.0.0/8"), ip_network("169.254.0.0/16")),
    )
    monkeypatch.delenv("CERTMAN_UPSTREAM_ALLOW_LINK_LOCAL")
    monkeypatch.delenv("CERTMAN_UPSTREAM_ALLOWED_NETWORKS")
    assert OutboundPolicy.from_settings(Settings()) == OutboundPolicy()


# --- the alert webhook follows no redirects ------------------------------------------------------
class _Receiver(BaseHTTPRequestHandler):
    """Records every request; answers ``server.status`` with ``server.location``, if any."""

    server: _Server

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.server.received.append((self.command, self.path, self.rfile.read(length)))
        self.send_response(self.server.status)
        if self.server.location:
            self.send_header("Location", self.server.location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    def __init__(self, status: int, location: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Receiver)
        self.status = status
        self.location = location
        self.received: list[tuple[str, str, bytes]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def _serving(status: int, location: str | None = None) -> Iterator[_Server]:
    with running(_Server(status, location)) as server:
        yield server


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_the_alert_webhook_follows_no_redirect(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    with _serving(200) as elsewhere, _serving(status) as redirector:
        redirector.location = f"{elsewhere.url}/stolen"
        with pytest.raises(WebhookRefused) as caught:
            post_webhook(f"{redirector.url}/hook", {"domain": "dealer.example.com"}, timeout=5)
        # post_webhook has returned: a redirect it followed would have been sent by now.
        assert elsewhere.received == []
    assert [(method, path) for method, path, _ in redirector.received] == [("POST", "/hook")]
    message = str(caught.value)
    # Where it points, without the path: a receiver's new address holds its secret too.
    assert f"HTTP {status} redirect to {elsewhere.url}/… not followed" in message
    assert "CERTMAN_ALERT_WEBHOOK" in message
    assert f"{elsewhere.url}/…" in caplog.text and "not followed" in caplog.text
    assert "stolen" not in message + caplog.text


def test_the_alert_webhook_still_delivers_without_a_redirect() -> None:
    with _serving(204) as receiver:
        post_webhook(f"{receiver.url}/hook", {"domain": "dealer.example.com"}, timeout=5)
    assert len(receiver.received) == 1
    method, path, body = receiver.received[0]
    assert (method, path, json.loads(body)) == ("POST", "/hook", {"domain": "dealer.example.com"})


SECRET_PATH = "/services/T0123/B0456/s3cr3tT0k3n"


@pytest.mark.parametrize("status", [0, 302, 404, 429, 500])
def test_the_alert_webhook_url_never_appears_in_a_log_line_or_an_error(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with _serving(status or 200) as receiver:
        if status == 302:
            receiver.location = f"{receiver.url}{SECRET_PATH}/moved"
        # 0: nothing listens there any more (a connection error quotes the URL it tried).
        url = f"{receiver.url}{SECRET_PATH}?key=s3cr3tK3y"
        if not status:
            receiver.shutdown()
            receiver.server_close()
        with pytest.raises((WebhookRefused, WebhookUnavailable)) as caught:
            post_webhook(url, {"domain": "dealer.example.com"}, timeout=5)
    shown = "\n".join(traceback.format_exception(caught.value)) + caplog.text
    assert "s3cr3t" not in shown
    assert f"{receiver.url}/…" in str(caught.value)
