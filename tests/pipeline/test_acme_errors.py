"""The CA's problem documents, classified as Let's Encrypt's integration guide asks.

Let's Encrypt production (its ``rateLimited`` answers with Retry-After) cannot run here, so
these feed real ``requests.Response`` objects through the real response check of our network
class; everything else about the ACME client runs against Pebble in tests/integration.
"""

from __future__ import annotations

import json

import pytest
import requests
from acme import messages

from pipeline.acme_client import _Network, classify
from pipeline.errors import AttemptFailed, NameRefused, RateLimited, RetryLater


def problem_response(
    status: int, problem: dict[str, str], headers: dict[str, str]
) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = json.dumps(problem).encode()
    response.headers.update({"Content-Type": "application/problem+json", **headers})
    return response


def check(response: requests.Response) -> Exception:
    network = _Network(key=None, limiter=None)
    with pytest.raises(messages.Error) as excinfo:
        network._check_response(response)
    return classify(excinfo.value)


def test_rate_limited_keeps_the_retry_after_the_library_drops() -> None:
    response = problem_response(
        429,
        {"type": "urn:ietf:params:acme:error:rateLimited",
         "detail": "too many new orders (300) from this account in the last 3h0m0s"},
        {"Retry-After": "1800"},
    )  # fmt: skip
    problem = check(response)
    assert isinstance(problem, RateLimited)
    assert problem.countdown == 1800
    assert "too many new orders" in problem.reason


def test_retry_after_as_an_http_date() -> None:
    response = problem_response(
        429,
        {"type": "urn:ietf:params:acme:error:rateLimited", "detail": "slow down"},
        {"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"},
    )
    problem = check(response)
    assert isinstance(problem, RateLimited) and problem.countdown > 3600


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("badNonce", 400, RetryLater),
        ("serverInternal", 500, RetryLater),
        ("rejectedIdentifier", 400, NameRefused),
        ("unauthorized", 403, NameRefused),
        ("caa", 403, NameRefused),
        ("malformed", 400, AttemptFailed),
    ],
)
def test_codes_are_classified(code: str, status: int, kind: type[Exception]) -> None:
    problem = check(
        problem_response(status, {"type": f"urn:ietf:params:acme:error:{code}", "detail": "x"}, {})
    )
    assert type(problem) is kind
    if kind is NameRefused:
        assert f"({code})" in str(problem)
