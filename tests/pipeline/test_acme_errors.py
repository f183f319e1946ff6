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

from pipeline.acme.client import _Network, classify
from pipeline.errors import (
    ACME_ERRORS,
    AttemptFailed,
    Meaning,
    NameRefused,
    Outcome,
    RateLimited,
    RetryLater,
    meaning,
    validation_problem,
)


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
    from pipeline import runtime
    from pipeline.issuance import OrderSteps

    steps = OrderSteps(runtime.current())
    limiter = steps.limiter
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
    url, _ = steps._new_ca_order(ca, ["r.example.com"], None, "aki.03ab", exempt)  # type: ignore[arg-type]
    assert url == "https://ca.test/acme/order/2"
    assert ca.asked == ["aki.03ab", None]
    # The order without the exemption counts against the limits once, never twice.
    assert reserved == ([True, False] if exempt else [False])


def test_another_refusal_of_a_renewal_is_not_retried(
    certman_env: dict[str, str], redis_client: object
) -> None:
    from pipeline import runtime
    from pipeline.issuance import OrderSteps

    _new_ca_order = OrderSteps(runtime.current())._new_ca_order

    refusal = check(
        problem_response(400, {"type": "urn:ietf:params:acme:error:malformed", "detail": "x"}, {})
    )
    ca = _LetsEncrypt(refusal)
    with pytest.raises(AttemptFailed):
        _new_ca_order(ca, ["r.example.com"], None, "aki.03ab", True)  # type: ignore[arg-type]
    assert ca.asked == ["aki.03ab"]


# --- the one table (pipeline.errors.ACME_ERRORS) ---------------------------------------------
EXPECTED_CLASS = {
    Outcome.RETRY: RetryLater,
    Outcome.RATE_LIMITED: RateLimited,
    Outcome.END_ATTEMPT: AttemptFailed,
    Outcome.REFUSED: NameRefused,
}


def _answer(code: str) -> Exception:
    return classify(messages.Error(typ=messages.ERROR_PREFIX + code, detail="x"))


@pytest.mark.parametrize("code", sorted(ACME_ERRORS))
def test_a_request_answered_with_an_error_type_does_what_the_table_says(code: str) -> None:
    problem = _answer(code)
    wanted = EXPECTED_CLASS[ACME_ERRORS[code].request]
    assert type(problem) is wanted
    if isinstance(problem, AttemptFailed):
        assert problem.error_type == code
    if isinstance(problem, RateLimited):
        assert problem.by_ca  # the CA's refusal, not our limiter's wait


@pytest.mark.parametrize("code", sorted(ACME_ERRORS))
def test_a_validation_ended_with_an_error_type_does_what_the_table_says(code: str) -> None:
    problem = validation_problem("x", code)
    outcome = ACME_ERRORS[code].validation
    assert type(problem) is EXPECTED_CLASS[outcome]
    assert problem.error_type == code


def test_unauthorized_blocks_an_order_but_only_backs_off_a_validation() -> None:
    # The disagreement the table settles: refused when ordering, the dealer's to fix (a token
    # the CA fetched and found wrong) when validating.
    assert type(_answer("unauthorized")) is NameRefused
    assert type(validation_problem("x", "unauthorized")) is AttemptFailed


def test_types_the_table_does_not_know_end_the_attempt_and_none_is_retried() -> None:
    assert meaning("badSignatureAlgorithm") == Meaning(Outcome.END_ATTEMPT)
    assert type(_answer("userActionRequired")) is AttemptFailed
    assert type(classify(messages.Error(typ=None, detail="502 Bad Gateway"))) is RetryLater
    assert type(classify(messages.Error(typ="about:blank", detail="?"))) is AttemptFailed


def test_our_limiters_wait_is_not_the_cas_refusal() -> None:
    assert not RateLimited("waiting for rate limit new-orders", 5).by_ca


@pytest.mark.parametrize(
    ("code", "detail", "flag"),
    [
        ("alreadyReplaced", "x", True),
        ("conflict", REPLACED, True),
        ("malformed", REPLACED, True),
        ("malformed", "something else", False),
        ("badCSR", REPLACED, False),
    ],
)
def test_already_replaced_is_a_flag_read_once_at_the_boundary(
    code: str, detail: str, flag: bool
) -> None:
    problem = classify(messages.Error(typ=messages.ERROR_PREFIX + code, detail=detail))
    assert isinstance(problem, AttemptFailed) and problem.already_replaced is flag
