"""An absolute-form target's authority follows the Host header's rules (edge.headerrules):
a spelling refused as Host is refused as the target's authority, on both ports."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from edge.targets import BadTarget, parse_target
from pipeline.distribution.layout import publish_site

from .conftest import RunningEdge, Sites, raw_exchange, status_of

REFUSED = (
    "http://a.test.../x",
    "http://a.test..:80/x",
    "http://a.test:/x",
    "http://a.test:0/x",
    "http://a.test:99999/x",
    "http://a.test:evil/x",
    "http://a_test%2e/x",
)
ACCEPTED = (
    ("http://a.test/x", "/x"),
    ("http://A.TEST./x?q=1", "/x?q=1"),
    ("https://a.test:8443/y", "/y"),
    ("http://a.test", "/"),
)


def test_absolute_form_authority_parsed_as_host() -> None:
    for raw in REFUSED:
        with pytest.raises(BadTarget):
            parse_target("GET", raw, "a.test")
    for raw, uri in ACCEPTED:
        assert parse_target("GET", raw, "a.test").uri == uri, raw


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_absolute_form_with_a_host_refused_spelling_gets_400(
    scheme: str,
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    publish_site(
        redis_client, prefix, sites.record("a.test", upstream=upstream, cert=scheme == "https")
    )
    edge = start_edge()
    edge.wait_ready()
    port = edge.https_port if scheme == "https" else edge.http_port
    tls = {"tls_name": "a.test", "pki": edge.pki} if scheme == "https" else {}

    def send(target: str) -> bytes:
        request = f"GET {target} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
        return raw_exchange(port, request.encode(), **tls)  # type: ignore[arg-type]

    for target in REFUSED:
        reply = send(target)
        assert status_of(reply) == 400, (target, reply[:200])
        assert b"Traceback" not in reply
    for target, _ in ACCEPTED:
        assert status_of(send(target)) == 200, target
