"""Tokens: made once and shown once, stored as a hash, scoped, revocable, rate limited, with
their last use recorded once a minute, and never in a log line or a metric."""

from __future__ import annotations

import json
import logging

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from pipeline.api.app import ApiConfig
from pipeline.models import ApiToken
from pipeline.setting_values import Rate
from tests.api.conftest import RunningApi

PROBLEM = "https://certman.dev/problems/"


def test_tokens_made_listed_and_revoked_by_the_cli(api: RunningApi) -> None:
    from pipeline.cli.commands import main

    runner = CliRunner()
    made = runner.invoke(
        main, ["api", "tokens", "create", "--name", "platform", "--scope", "sites:read",
               "--scope", "sites:write", "--json"], obj=api.runtime,
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    token = json.loads(made.output)["token"]
    assert token.startswith("cmt_") and len(token) >= 40
    with api.runtime.session_scope() as session:
        row = session.scalar(select(ApiToken).where(ApiToken.name == "platform"))
        assert row is not None and token not in (row.token_hash, row.scopes)
    assert api.call("GET", "/v1/sites", token).status_code == 200
    listed = runner.invoke(main, ["api", "tokens", "list", "--json"], obj=api.runtime)
    assert token not in listed.output
    [entry] = json.loads(listed.output)
    assert entry["name"] == "platform" and entry["scopes"] == ["sites:read", "sites:write"]
    assert entry["last_used_at"] is not None and entry["revoked_at"] is None
    again = runner.invoke(main, ["api", "tokens", "create", "--name", "platform", "--scope",
                                 "sites:read"], obj=api.runtime)  # fmt: skip
    assert again.exit_code == 1 and "exists" in again.output
    revoked = runner.invoke(main, ["api", "tokens", "revoke", "platform"], obj=api.runtime)
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    refused = api.call("GET", "/v1/sites", token)
    assert refused.status_code == 401 and refused.json()["type"] == PROBLEM + "unauthorised"
    unknown = runner.invoke(main, ["api", "tokens", "revoke", "nobody"], obj=api.runtime)
    assert unknown.exit_code == 1 and "no token named nobody" in unknown.output


def test_last_use_is_written_at_most_once_a_minute(api: RunningApi) -> None:
    token = api.token("sites:read", name="reader")

    def last_used() -> object:
        with api.runtime.session_scope() as session:
            return session.scalar(select(ApiToken.last_used_at).where(ApiToken.name == "reader"))

    assert last_used() is None
    api.call("GET", "/v1/sites", token)
    first = last_used()
    assert first is not None
    for _ in range(3):
        assert api.call("GET", "/v1/sites", token).status_code == 200
    assert last_used() == first


@pytest.mark.parametrize("api_config", [ApiConfig(rate=Rate(3, 60))])
def test_each_token_has_its_own_rate_limit(api: RunningApi) -> None:
    busy = api.token("sites:read", name="busy")
    other = api.token("sites:read", name="other")
    for _ in range(3):
        assert api.call("GET", "/v1/sites", busy).status_code == 200
    limited = api.call("GET", "/v1/sites", busy)
    assert limited.status_code == 429 and limited.json()["type"] == PROBLEM + "rate-limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 20
    assert api.call("GET", "/v1/sites", other).status_code == 200
    # The bucket is named by the token's id, never by the token.
    keys = [k.decode() for k in api.runtime.redis.scan_iter(match="*:api:*")]
    assert keys and not any(busy in k for k in keys)


@pytest.mark.parametrize("api_config", [ApiConfig(max_body=2048)])
def test_a_body_over_the_limit_is_refused(api: RunningApi) -> None:
    token = api.token("sites:write", name="writer")
    big = {"sites": [{"domain": f"site{i}.example.com"} for i in range(200)]}
    refused = api.call("POST", "/v1/sites/batch", token, json=big)
    assert refused.status_code == 413 and refused.json()["type"] == PROBLEM + "too-large"
    # Refused on its headers: the answer comes before any of the body is sent.
    import http.client
    from urllib.parse import urlsplit

    address = urlsplit(api.url)
    connection = http.client.HTTPConnection(address.hostname or "", address.port, timeout=30)
    try:
        connection.putrequest("PUT", "/v1/sites/d.example.com")
        for name, value in (("Authorization", f"Bearer {token}"), ("Content-Length", "200000"),
                            ("Content-Type", "application/json")):  # fmt: skip
            connection.putheader(name, value)
        connection.endheaders()
        huge = connection.getresponse()
        assert huge.status == 413
        assert json.loads(huge.read())["type"] == PROBLEM + "too-large"
    finally:
        connection.close()


def test_tokens_never_reach_a_log_line_or_a_metric(
    api: RunningApi, caplog: pytest.LogCaptureFixture
) -> None:
    token = api.token("sites:read", "sites:write", name="platform")
    with caplog.at_level(logging.DEBUG):
        api.call("PUT", "/v1/sites/dealer.example.com", token, json={})
        api.call("GET", "/v1/sites/dealer.example.com", token)
        api.call("GET", "/v1/sites", "cmt_" + token[4:][::-1])  # a wrong one, logged as refused
        api.call("PUT", "/v1/sites/co.uk", token, json={})
    lines = [record.getMessage() for record in caplog.records]
    access = [line for line in lines if "/v1/sites" in line]
    assert len(access) >= 4, lines
    assert any("api:platform" in line for line in access)
    hash_ = __import__("hashlib").sha256(token.encode()).hexdigest()
    for line in lines:
        assert token not in line and token[4:20] not in line and hash_ not in line
    metrics = api.call("GET", "/metrics").text
    assert token not in metrics and "platform" not in metrics
