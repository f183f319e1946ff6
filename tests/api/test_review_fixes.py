"""The reviewer's findings (issue #25): each answered as a problem, never a 500 or a lost
update, with real threads on both stores."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from pipeline.api.app import ApiConfig
from pipeline.api.handlers import as_problem
from pipeline.crypto.envelope import EnvelopeError
from pipeline.fleet.sites import update_site
from pipeline.models import Site, SiteState
from pipeline.setting_values import Rate
from tests.api.conftest import RunningApi
from tests.api.test_sites_api import DOMAIN, _problem

SITE = f"/v1/sites/{DOMAIN}"


def _together(calls: list[Callable[[], requests.Response]]) -> list[requests.Response]:
    """Every call at once, each from a thread of its own (and its own connection)."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], requests.Response]) -> requests.Response:
        barrier.wait(10)
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def _put(api: RunningApi, token: str, body: dict[str, Any], **headers: str) -> Callable[[], Any]:
    def call() -> requests.Response:
        with requests.Session() as http:
            return http.put(api.url + SITE, json=body, timeout=30,
                            headers={"Authorization": f"Bearer {token}", **headers})  # fmt: skip

    return call


def _delete(api: RunningApi, token: str, **headers: str) -> Callable[[], Any]:
    def call() -> requests.Response:
        with requests.Session() as http:
            return http.delete(api.url + SITE, timeout=30,
                               headers={"Authorization": f"Bearer {token}", **headers})  # fmt: skip

    return call


# --- 3: a deeply nested body ----------------------------------------------------------------
def test_a_deeply_nested_body_is_an_invalid_request(api: RunningApi) -> None:
    token = api.token("sites:read", "sites:write", "sites:operate", name="deep")
    deep = b"[" * 200_000
    sent = {"Content-Type": "application/json"}
    for method, path in (("PUT", SITE), ("POST", SITE + "/revoke"), ("POST", "/v1/sites/batch")):
        answer = api.call(method, path, token, data=deep, headers=sent)
        body = _problem(answer, 400, "invalid-request")
        assert "nests" in str(body["detail"])


# --- 4: If-Match cannot lose an update --------------------------------------------------------
def test_concurrent_puts_with_one_etag_one_wins(api: RunningApi) -> None:
    token = api.token("sites:read", "sites:write", name="racer")
    for round_ in range(3):
        created = api.call("PUT", SITE, token, json={"upstream": "http://10.0.0.1:80"})
        assert created.status_code in (200, 201), created.text
        etag = created.headers["ETag"]
        upstreams = [f"http://10.0.{round_}.{n}:80" for n in range(2, 8)]
        answers = _together([_put(api, token, {"upstream": u}, **{"If-Match": etag})
                             for u in upstreams])  # fmt: skip
        won = [(u, a) for u, a in zip(upstreams, answers, strict=True) if a.status_code == 200]
        assert len(won) == 1, [a.status_code for a in answers]
        for answer in answers:
            if answer.status_code != 200:
                _problem(answer, 412, "precondition-failed")
        shown = api.call("GET", SITE, token)
        assert shown.json()["upstream"] == won[0][0]
        assert shown.headers["ETag"] == won[0][1].headers["ETag"] != etag
        api.call("DELETE", SITE, token)


def test_concurrent_puts_without_if_match_all_apply(api: RunningApi) -> None:
    token = api.token("sites:read", "sites:write", name="racer")
    api.call("PUT", SITE, token, json={"upstream": "http://10.0.0.1:80"})
    upstreams = [f"http://10.0.1.{n}:80" for n in range(2, 6)]
    answers = _together([_put(api, token, {"upstream": u}) for u in upstreams])
    # Without If-Match a change that got in first is applied over (retried), or, past the
    # retries, a conflict to try again: never a 500, never two changes merged.
    assert {a.status_code for a in answers} <= {200, 409}, [a.text for a in answers]
    assert any(a.status_code == 200 for a in answers)
    history = api.call("GET", SITE, token).json()["history"]
    assert len([h for h in history if h["action"] == "update"]) == sum(
        a.status_code == 200 for a in answers
    )


def test_a_delete_never_removes_a_change_it_did_not_see(api: RunningApi) -> None:
    token = api.token("sites:read", "sites:write", name="racer")
    for round_ in range(3):
        etag = api.call("PUT", SITE, token, json={"upstream": "http://10.0.0.1:80"}).headers["ETag"]
        put, delete = _together([
            _put(api, token, {"upstream": f"http://10.0.2.{round_}:80"}, **{"If-Match": etag}),
            _delete(api, token, **{"If-Match": etag}),
        ])  # fmt: skip
        if put.status_code == 200:
            _problem(delete, 412, "precondition-failed")
            assert api.call("GET", SITE, token).json()["upstream"] == f"http://10.0.2.{round_}:80"
            api.call("DELETE", SITE, token)
        else:
            assert delete.status_code == 202, delete.text
            _problem(put, 412, "precondition-failed")
            _problem(api.call("GET", SITE, token), 404, "not-found")


def test_a_workers_state_change_keeps_the_etag_a_cli_change_moves_it(api: RunningApi) -> None:
    token = api.token("sites:read", "sites:write", name="platform")
    etag = api.call("PUT", SITE, token, json={"upstream": "http://10.0.0.1:80"}).headers["ETag"]
    from sqlalchemy import select

    with api.runtime.session_scope() as session:  # as a worker moves a site along
        site = session.scalar(select(Site).where(Site.domain == DOMAIN))
        assert site is not None
        site.state = SiteState.ISSUING
        site.consecutive_failures = 1
    assert api.call("GET", SITE, token).headers["ETag"] == etag
    moved = api.call("PUT", SITE, token, json={"upstream": "http://10.0.0.2:80"},
                     headers={"If-Match": etag})  # fmt: skip
    assert moved.status_code == 200, moved.text
    from pipeline.fleet.sites import SiteRules

    with api.runtime.session_scope() as session:  # certman domains update
        rules = SiteRules.from_settings(api.runtime.settings)
        update_site(session, DOMAIN, customer_ref="C-1", rules=rules)
    stale = api.call("PUT", SITE, token, json={"upstream": "http://10.0.0.3:80"},
                     headers={"If-Match": moved.headers["ETag"]})  # fmt: skip
    _problem(stale, 412, "precondition-failed")


def test_a_site_added_again_does_not_match_the_old_etag(api: RunningApi) -> None:
    token = api.token("sites:read", "sites:write", name="platform")
    body = {"upstream": "http://10.0.0.1:80"}
    etag = api.call("PUT", SITE, token, json=body).headers["ETag"]
    assert api.call("DELETE", SITE, token).status_code == 202
    again = api.call("PUT", SITE, token, json=body)
    assert again.status_code == 201 and again.headers["ETag"] != etag
    _problem(api.call("PUT", SITE, token, json=body, headers={"If-Match": etag}), 412,
             "precondition-failed")  # fmt: skip


# --- 7: revoking needs the workers' pipeline key, never makes one ------------------------------
def test_revoking_without_the_pipeline_key_names_the_setting(api: RunningApi) -> None:
    from pipeline.api.problems import Problem

    path = api.runtime.settings.effective_pipeline_key
    if path.exists():
        path.unlink()
    with pytest.raises(Problem) as refused:
        api.ctx.service._acme_client(None)
    assert refused.value.kind.status == 503
    assert "CERTMAN_PIPELINE_KEY" in str(refused.value.detail)
    assert str(path) not in str(refused.value.detail)
    assert not path.exists()


def test_a_sealed_key_the_pipeline_key_cannot_open_is_unavailable() -> None:
    problem = as_problem(EnvelopeError("acme-account", "no key of the keyring opens it"))
    assert problem is not None and problem.kind.status == 503
    assert "CERTMAN_PIPELINE_KEY" in str(problem.detail)


# --- 8: metric labels -------------------------------------------------------------------------
def test_an_unknown_method_is_counted_as_other(api: RunningApi) -> None:
    with requests.Session() as http:  # Tornado closes the connection after this answer
        answer = http.request("FROBNICATE", api.url + "/v1/status", timeout=30)
    assert answer.status_code == 405
    metrics = api.call("GET", "/metrics").text
    assert 'method="OTHER"' in metrics and "FROBNICATE" not in metrics


# --- 9: unauthenticated requests ----------------------------------------------------------------
@pytest.fixture
def strict_config() -> ApiConfig:
    return ApiConfig(auth_failures=Rate(3, 3600))


@pytest.fixture
def strict_api(
    certman_env: dict[str, str], strict_config: ApiConfig, redis_client: Any
) -> Iterator[RunningApi]:
    from tests.api.conftest import serving

    with serving(strict_config) as running:
        yield running


def test_failed_authentications_are_limited_per_address(strict_api: RunningApi) -> None:
    good = strict_api.token("sites:read", name="reader")
    assert strict_api.call("GET", "/v1/status", good).status_code == 200
    for _ in range(3):
        _problem(strict_api.call("GET", "/v1/status", "cm_bad"), 401, "unauthorised")
    refused = strict_api.call("GET", "/v1/status", "cm_bad")
    body = _problem(refused, 429, "rate-limited")
    assert "failed authentications" in str(body["detail"])
    assert int(refused.headers["Retry-After"]) >= 1
    # The address is refused before any token of it is looked up, a good one too.
    _problem(strict_api.call("GET", "/v1/status", good), 429, "rate-limited")


def test_a_refused_requests_body_is_not_kept(api: RunningApi) -> None:
    kept: list[int] = []
    from pipeline.api import handlers

    original = handlers.ApiHandler.on_finish

    def spy(self: handlers.ApiHandler) -> None:
        kept.append(len(self._body))
        original(self)

    handlers.ApiHandler.on_finish = spy  # type: ignore[method-assign]
    try:
        chunks = (b"x" * 65536 for _ in range(8))  # sent chunked: read after prepare
        answer = api.call("PUT", SITE, None, data=chunks,
                          headers={"Content-Type": "application/json"})  # fmt: skip
        _problem(answer, 401, "unauthorised")
        # on_finish runs in the server's thread once the answer is sent: polled for.
        deadline = time.monotonic() + 10
        while not kept and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        handlers.ApiHandler.on_finish = original  # type: ignore[method-assign]
    assert kept == [0]


# --- 10: batch -----------------------------------------------------------------------------------
def test_batch_refuses_when_the_edge_key_is_unreadable(api: RunningApi) -> None:
    from pipeline.crypto.keys import KeyFileError

    token = api.token("sites:write", name="bulk")

    def unreadable(outcome: str) -> None:
        raise KeyFileError("edge.pub", "cannot be read", outcome)

    api.ctx.service.check_edge_key = unreadable
    answer = api.call("POST", "/v1/sites/batch", token, json={"sites": [{"domain": DOMAIN}]})
    _problem(answer, 503, "unavailable")
    with api.runtime.session_scope() as session:
        from sqlalchemy import func, select

        assert session.scalar(select(func.count()).select_from(Site)) == 0


def test_batch_losing_every_race_is_a_conflict(
    api: RunningApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.fleet import onboarding

    # Another writer taking a batch's names every time cannot be timed here: each write of
    # the batch is told it lost the race, as _write says when an insert finds a name taken.
    monkeypatch.setattr(onboarding.Onboarding, "_write", lambda self, batch: None)
    token = api.token("sites:write", name="bulk")
    answer = api.call("POST", "/v1/sites/batch", token, json={"sites": [{"domain": DOMAIN}]})
    _problem(answer, 409, "conflict")


def test_batch_publish_failure_after_the_commit_is_per_line(
    api: RunningApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    from pipeline.distribution import publishing

    real = publishing.publish_records

    # Redis failing between the commit and the publication (it cannot be timed otherwise).
    def down(*args: Any, **kwargs: Any) -> None:
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(publishing, "publish_records", down)
    token = api.token("sites:read", "sites:write", name="bulk")
    sites = {"sites": [{"domain": DOMAIN}, {"domain": "bad name"}]}
    answer = api.call("POST", "/v1/sites/batch", token, json=sites)
    assert answer.status_code == 200, answer.text
    first, second = answer.json()["results"]
    assert first["outcome"] == "added" and first["published"] is False
    assert "send the batch again" in first["reason"]
    assert second["outcome"] == "rejected" and "published" not in second
    assert api.call("GET", SITE, token).status_code == 200  # stored
    signed = f"{api.runtime.settings.redis_prefix}:signed"
    assert api.runtime.redis.hget(signed, DOMAIN) is None  # not published
    monkeypatch.setattr(publishing, "publish_records", real)
    again = api.call("POST", "/v1/sites/batch", token, json=sites).json()["results"][0]
    assert again["outcome"] == "already" and again["published"] is True
    assert again["reason"] is None
    assert api.runtime.redis.hget(signed, DOMAIN) is not None  # published on the retry
