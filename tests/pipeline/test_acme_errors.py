"""The CA's problem documents, classified as Let's Encrypt's integration guide asks.

Let's Encrypt production (its ``rateLimited`` answers with Retry-After) cannot run here, so
these feed real ``requests.Response`` objects through the real response check of our network
class; everything else about the ACME client runs against Pebble in tests/integration.
"""

from __future__ import annotations

import json
from typing import Any

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


class _LetsEncrypt:
    """Let's Encrypt refusing a second order that names a certificate it already has a
    replacement order for (Pebble 2.6 refuses only once the replacement is finalised)."""

    account_uri = "https://ca.test/acme/acct/1"

    def __init__(self, refusal: Exception) -> None:
        self.refusal = refusal
        self.asked: list[str | None] = []

    def new_order(
        self, names: list[str], *, profile: str | None, replaces: str | None
    ) -> tuple[str, messages.Order]:
        self.asked.append(replaces)
        if replaces is not None:
            raise self.refusal
        return "https://ca.test/acme/order/2", messages.Order(status=messages.STATUS_PENDING)


REPLACED = 'cannot indicate an order replaces certificate with serial "03ab", which already has a replacement order'  # noqa: E501


@pytest.mark.parametrize("code", ["alreadyReplaced", "conflict", "malformed"])
@pytest.mark.parametrize("exempt", [True, False])
def test_a_renewal_refused_as_already_replaced_orders_without_naming_it(
    certman_env: dict[str, str],
    redis_client: object,
    monkeypatch: pytest.MonkeyPatch,
    code: str,
    exempt: bool,
) -> None:
    from pipeline import issuance
    from pipeline.connections import get_limiter

    limiter = get_limiter()
    reserved: list[bool] = []
    real = limiter.reserve_new_order

    def counting(*args: Any, exempt: bool, **kwargs: Any) -> Any:
        reserved.append(exempt)
        return real(*args, exempt=exempt, **kwargs)

    monkeypatch.setattr(limiter, "reserve_new_order", counting)
    refusal = check(
        problem_response(
            409, {"type": f"urn:ietf:params:acme:error:{code}", "detail": REPLACED}, {}
        )
    )
    ca = _LetsEncrypt(refusal)
    url, _ = issuance._new_ca_order(ca, ["r.example.com"], None, "aki.03ab", exempt)  # type: ignore[arg-type]
    assert url == "https://ca.test/acme/order/2"
    assert ca.asked == ["aki.03ab", None]
    # The order without the exemption counts against the limits once, never twice.
    assert reserved == ([True, False] if exempt else [False])


def test_another_refusal_of_a_renewal_is_not_retried(
    certman_env: dict[str, str], redis_client: object
) -> None:
    from pipeline.issuance import _new_ca_order

    refusal = check(
        problem_response(400, {"type": "urn:ietf:params:acme:error:malformed", "detail": "x"}, {})
    )
    ca = _LetsEncrypt(refusal)
    with pytest.raises(AttemptFailed):
        _new_ca_order(ca, ["r.example.com"], None, "aki.03ab", True)  # type: ignore[arg-type]
    assert ca.asked == ["aki.03ab"]
