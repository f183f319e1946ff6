"""The client address behind the per-address limit on failed authentications: a client cannot
choose it by sending X-Forwarded-For, a trusted proxy can."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pipeline.api.app import ApiConfig
from pipeline.api.clients import client_address, parse_network
from pipeline.setting_values import Rate
from tests.api.conftest import RunningApi, serving

PROXIES = (parse_network("10.0.0.0/8"), parse_network("2001:db8::1"))


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        # Not from a trusted proxy: the header is the client's own words.
        ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),
        ("203.0.113.9", [], "203.0.113.9"),
        # From a proxy: its entry names the client; what the client wrote to its left is not read.
        ("10.0.0.5", ["1.2.3.4, 198.51.100.7"], "198.51.100.7"),
        # Through two proxies, over two header lines.
        ("10.0.0.5", ["1.2.3.4, 198.51.100.7", "10.1.1.1"], "198.51.100.7"),
        # A proxy with no header: the proxy's own address.
        ("10.0.0.5", [], "10.0.0.5"),
        # Garbage in a proxy's place: stop at the last trusted hop.
        ("10.0.0.5", ["198.51.100.7, not-an-address"], "10.0.0.5"),
        # Every hop a proxy: the leftmost.
        ("10.0.0.5", ["10.9.9.9"], "10.9.9.9"),
        # IPv6 proxy; an IPv4 peer seen through a dual-stack socket.
        ("2001:db8::1", ["2001:db8:ffff::2"], "2001:db8:ffff::2"),
        ("::ffff:10.0.0.5", ["198.51.100.7"], "198.51.100.7"),
        (None, ["198.51.100.7"], "unknown"),
    ],
)
def test_the_client_address(peer: str | None, forwarded: list[str], client: str) -> None:
    assert client_address(peer, forwarded, PROXIES) == client


def test_a_network_that_is_not_one_is_named() -> None:
    with pytest.raises(ValueError, match="not an IP address or network: '10.0.0.0/33'"):
        parse_network("10.0.0.0/33")


@pytest.fixture
def direct_api(certman_env: dict[str, str], redis_client: Any) -> Iterator[RunningApi]:
    with serving(ApiConfig(auth_failures=Rate(3, 3600))) as running:
        yield running


@pytest.fixture
def proxied_api(certman_env: dict[str, str], redis_client: Any) -> Iterator[RunningApi]:
    proxy = (parse_network("127.0.0.1"),)
    with serving(ApiConfig(auth_failures=Rate(3, 3600), trusted_proxies=proxy)) as running:
        yield running


def _status(api: RunningApi, forwarded_for: str) -> int:
    answer = api.call("GET", "/v1/status", "cm_bad", headers={"X-Forwarded-For": forwarded_for})
    return answer.status_code


def test_a_new_forwarded_address_for_each_bad_token_does_not_escape_the_limit(
    direct_api: RunningApi,
) -> None:
    codes = [_status(direct_api, f"198.51.100.{i}") for i in range(5)]
    assert codes == [401, 401, 401, 429, 429]


def test_behind_a_trusted_proxy_each_client_has_its_own_limit(proxied_api: RunningApi) -> None:
    codes = [_status(proxied_api, "198.51.100.1") for _ in range(4)]
    assert codes == [401, 401, 401, 429]
    # Another client behind the same proxy is not held back by the first one's failures.
    assert _status(proxied_api, "198.51.100.2") == 401
