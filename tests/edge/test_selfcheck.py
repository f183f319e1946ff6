"""The pipeline's self-check against a real edge: whose fault a failed fetch is."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis

from pipeline import selfcheck
from pipeline.distribution import EDGE_HEADER, set_challenge

from .conftest import RunningEdge

TOKEN = "probe-token-of-forty-three-characters-abcde"


class _SomebodyElse(BaseHTTPRequestHandler):
    """A dealer's old host: 404 for any challenge, as a web server that knows nothing of it."""

    def do_GET(self) -> None:
        self.send_error(404)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def elsewhere() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SomebodyElse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _check(port: int, expected: str = "the key authorization") -> selfcheck.Problem | None:
    return selfcheck.check("localhost", TOKEN, expected, port=port, resolver=None)


def test_the_edge_answers_the_probe(
    redis_client: redis.Redis, prefix: str, start_edge: Callable[..., RunningEdge]
) -> None:
    edge = start_edge()
    edge.wait_ready()
    set_challenge(redis_client, prefix, TOKEN, "the key authorization", ttl=60)
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
