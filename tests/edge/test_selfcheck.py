"""The pipeline's self-check against a real edge: whose fault a failed fetch is."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis

from pipeline.acme import selfcheck
from pipeline.distribution.layout import EDGE_HEADER, set_challenge
from tests.support.dns_server import DnsServer
from tests.support.http_servers import running
from tests.support.loopback_only import loopback_only

from .conftest import Keys, RunningEdge

TOKEN = "probe-token-of-forty-three-characters-abcde"


class _SomebodyElse(BaseHTTPRequestHandler):
    """A dealer's old host: 404 for any challenge, as a web server that knows nothing of it."""

    def do_GET(self) -> None:
        self.send_error(404)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def elsewhere() -> Iterator[int]:
    with running(ThreadingHTTPServer(("127.0.0.1", 0), _SomebodyElse)) as server:
        yield server.server_address[1]


def _check(port: int, expected: str = "the key authorization") -> selfcheck.Problem | None:
    return selfcheck.check("localhost", TOKEN, expected, port=port, resolver=None)


def test_the_edge_answers_the_probe(
    keys: Keys, redis_client: redis.Redis, prefix: str, start_edge: Callable[..., RunningEdge]
) -> None:
    edge = start_edge()
    edge.wait_ready()
    set_challenge(redis_client, prefix, TOKEN, "the key authorization", ttl=60, signer=keys.signer)
    assert _check(edge.http_port) is None
    status, headers, _ = edge.http("localhost", f"/.well-known/acme-challenge/{TOKEN}")
    assert status == 200 and headers.get(EDGE_HEADER) == "1"


def test_an_edge_without_the_token_is_our_fault(
    redis_client: redis.Redis, prefix: str, start_edge: Callable[..., RunningEdge]
) -> None:
    edge = start_edge()
    edge.wait_ready()
    problem = _check(edge.http_port)  # nothing stored: as an edge that lost Redis answers
    assert problem is not None and problem.ours
    assert "answered 404" in problem.reason and "connected to Redis" in problem.reason


def test_somebody_else_answering_is_the_dealers_dns(elsewhere: int) -> None:
    problem = _check(elsewhere)
    assert problem is not None and not problem.ours
    assert problem.reason.startswith("DNS for localhost does not reach the edge")


# --- addresses the self-check never fetches from -------------------------------------------------
@pytest.mark.parametrize(
    ("v4", "v6", "shown", "reason"),
    [
        (["169.254.169.254"], [], "169.254.169.254", "cloud metadata service"),
        (["127.0.0.1"], ["fd00:ec2::254"], "fd00:ec2::254", "AWS instance metadata service"),
        (["127.0.0.1"], ["::ffff:169.254.169.254"], "::ffff:a9fe:a9fe",
         "IPv4-mapped 169.254.169.254"),
        (["100.100.100.200"], [], "100.100.100.200", "Alibaba Cloud metadata service"),
        (["169.254.3.4"], [], "169.254.3.4", "link-local (169.254.0.0/16)"),
        (["0.0.0.0"], [], "0.0.0.0", "unspecified"),
    ],
)  # fmt: skip
def test_dns_pointing_at_a_refused_address_fails_the_name_without_fetching(
    elsewhere: int, v4: list[str], v6: list[str], shown: str, reason: str
) -> None:
    """A dealer's DNS must not make a worker fetch from the metadata service: the name fails,
    with the address and the reason, before any connection is made (the loopback guard would
    stop and record one)."""
    with DnsServer({"dealer.example.com": (v4, v6)}) as dns, loopback_only() as attempts:
        problem = selfcheck.check(
            "dealer.example.com", TOKEN, "the key authorization", port=elsewhere,
            resolver=dns.address,
        )  # fmt: skip
    assert attempts == []
    assert problem is not None and not problem.ours
    assert problem.reason.startswith(f"DNS for dealer.example.com resolves to {shown}, ")
    assert reason in problem.reason
    assert ("dealer.example.com", "A") in dns.queries


def test_a_refused_address_fails_the_name_even_beside_a_good_one(
    keys: Keys, redis_client: redis.Redis, prefix: str, start_edge: Callable[..., RunningEdge]
) -> None:
    """127.0.0.1 is the edge and would answer; the metadata address beside it still fails the
    name, and nothing is fetched from either."""
    edge = start_edge()
    edge.wait_ready()
    set_challenge(redis_client, prefix, TOKEN, "the key authorization", ttl=60, signer=keys.signer)
    with DnsServer({"dealer.example.com": (["127.0.0.1", "169.254.169.254"], [])}) as dns:
        assert selfcheck.check(
            "dealer.example.com", TOKEN, "the key authorization", port=edge.http_port,
            resolver=dns.address,
        ) is not None  # fmt: skip
    with DnsServer({"dealer.example.com": (["127.0.0.1"], [])}) as dns:
        assert selfcheck.check(
            "dealer.example.com", TOKEN, "the key authorization", port=edge.http_port,
            resolver=dns.address,
        ) is None  # fmt: skip
