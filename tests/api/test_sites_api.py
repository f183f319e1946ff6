"""The API as the platform uses it: sites in and out, with the CLI's rules and messages."""

from __future__ import annotations

import json

from click.testing import CliRunner

from tests.api.conftest import RunningApi

PROBLEM = "https://certman.dev/problems/"
DOMAIN = "dealer.example.com"


def _problem(response: object, status: int, slug: str) -> dict[str, object]:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    assert response.headers["Content-Type"] == "application/problem+json"  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert body["type"] == PROBLEM + slug and body["status"] == status
    assert "Traceback" not in json.dumps(body)
    return body  # type: ignore[no-any-return]


def test_put_creates_then_updates_in_place_with_etags(api: RunningApi) -> None:
    token = api.token("sites:read", "sites:write", name="platform")
    body = {"upstream": "http://10.0.0.5:8080", "aliases": ["www.dealer.example.com"]}
    created = api.call("PUT", f"/v1/sites/{DOMAIN}", token, json=body)
    assert created.status_code == 201, created.text
    assert created.json()["domain"] == DOMAIN and created.json()["state"] == "pending"
    etag = created.headers["ETag"]
    again = api.call("PUT", f"/v1/sites/{DOMAIN}", token, json=body)  # idempotent
    assert again.status_code == 200 and again.headers["ETag"] == etag
    moved = api.call(
        "PUT", f"/v1/sites/{DOMAIN}", token, json={"upstream": "http://10.0.0.6:8080"},
        headers={"If-Match": etag},
    )  # fmt: skip
    assert moved.status_code == 200 and moved.json()["upstream"] == "http://10.0.0.6:8080"
    assert moved.headers["ETag"] != etag
    # The ETag the first writer holds is stale now: its update is refused, nothing changes.
    lost = api.call(
        "PUT", f"/v1/sites/{DOMAIN}", token, json={"upstream": "http://10.0.0.7:8080"},
        headers={"If-Match": etag},
    )  # fmt: skip
    _problem(lost, 412, "precondition-failed")
    shown = api.call("GET", f"/v1/sites/{DOMAIN}", token)
    assert shown.json()["upstream"] == "http://10.0.0.6:8080"
    assert shown.headers["ETag"] == moved.headers["ETag"]
    history = shown.json()["history"]
    assert [(h["action"], h["actor"]) for h in history] == [
        ("update", "api:platform"),
        ("add", "api:platform"),
    ]
    assert "upstream http://10.0.0.5:8080 -> http://10.0.0.6:8080" in history[0]["detail"]
    # Aliases given are the whole list: the one left out is removed.
    trimmed = api.call("PUT", f"/v1/sites/{DOMAIN}", token, json={"aliases": []})
    assert trimmed.status_code == 200 and trimmed.json()["aliases"] == []
    exists = api.call("PUT", f"/v1/sites/{DOMAIN}", token, json={}, headers={"If-None-Match": "*"})
    _problem(exists, 412, "precondition-failed")


def test_a_site_is_what_domains_show_json_prints(api: RunningApi) -> None:
    from pipeline.cli.commands import main

    token = api.token("sites:read", "sites:write", name="platform")
    api.call("PUT", f"/v1/sites/{DOMAIN}", token, json={"aliases": ["www.dealer.example.com"]})
    shown = api.call("GET", f"/v1/sites/{DOMAIN}", token).json()
    printed = CliRunner().invoke(main, ["domains", "show", DOMAIN, "--json"], obj=api.runtime)
    assert printed.exit_code == 0, printed.output
    assert shown == json.loads(printed.output)
    assert shown["history"][0]["actor"] == "api:platform"


def test_the_cli_records_its_changes_as_the_unix_user(api: RunningApi) -> None:
    import getpass

    from pipeline.cli.commands import main

    runner = CliRunner()
    added = runner.invoke(main, ["domains", "add", DOMAIN], obj=api.runtime)
    assert added.exit_code == 0, added.output
    runner.invoke(main, ["domains", "update", DOMAIN, "--upstream", "http://10.0.0.9"],
                  obj=api.runtime)  # fmt: skip
    shown = runner.invoke(main, ["domains", "show", DOMAIN], obj=api.runtime)
    assert f"cli:{getpass.getuser()}" in shown.output and "history (newest first):" in shown.output
    report = json.loads(runner.invoke(main, ["domains", "show", DOMAIN, "--json"],
                                      obj=api.runtime).output)  # fmt: skip
    assert [h["action"] for h in report["history"]] == ["update", "add"]
    removed = runner.invoke(main, ["domains", "remove", DOMAIN], obj=api.runtime)
    assert removed.exit_code == 0
    from pipeline.fleet.site_report import site_history

    with api.runtime.session_scope() as session:  # the history outlives the site
        assert [h["action"] for h in site_history(session, DOMAIN)] == ["remove", "update", "add"]


def test_failures_are_problem_documents_with_stable_types(api: RunningApi) -> None:
    token = api.token("sites:read", "sites:write", name="platform")
    reader = api.token("sites:read", name="reader")
    _problem(api.call("PUT", "/v1/sites/co.uk", token, json={}), 400, "bad-name")
    refused = api.call("PUT", f"/v1/sites/{DOMAIN}", token,
                       json={"upstream": "http://169.254.169.254/"})  # fmt: skip
    assert "cloud metadata" in _problem(refused, 400, "refused-upstream")["detail"]  # type: ignore[operator]
    _problem(api.call("GET", "/v1/sites/nowhere.example.com", token), 404, "not-found")
    api.call("PUT", f"/v1/sites/{DOMAIN}", token, json={"aliases": ["www.dealer.example.com"]})
    taken = api.call("PUT", "/v1/sites/other.example.com", token,
                     json={"aliases": ["www.dealer.example.com"]})  # fmt: skip
    assert "already belongs to site" in _problem(taken, 409, "conflict")["detail"]  # type: ignore[operator]
    alias = api.call("GET", "/v1/sites/www.dealer.example.com", token)
    assert "alias of dealer.example.com" in _problem(alias, 404, "not-found")["detail"]  # type: ignore[operator]
    _problem(api.call("PUT", f"/v1/sites/{DOMAIN}", token, json={"colour": "red"}), 400,
             "invalid-request")  # fmt: skip
    as_json = {"Content-Type": "application/json"}
    broken = api.call("PUT", f"/v1/sites/{DOMAIN}", token, data=b"{nope", headers=as_json)
    _problem(broken, 400, "invalid-request")
    as_text = {"Content-Type": "text/plain"}
    text = api.call("PUT", f"/v1/sites/{DOMAIN}", token, data=b"x=1", headers=as_text)
    _problem(text, 415, "unsupported-media-type")
    missing = api.call("GET", "/v1/sites")
    _problem(missing, 401, "unauthorised")
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    _problem(api.call("GET", "/v1/sites", "cmt_not-a-token"), 401, "unauthorised")
    _problem(api.call("PUT", f"/v1/sites/{DOMAIN}", reader, json={}), 403, "forbidden")
    _problem(api.call("POST", f"/v1/sites/{DOMAIN}/renew", token), 403, "forbidden")
    _problem(api.call("GET", "/v2/nothing", token), 404, "no-route")
    wrong = api.call("PATCH", f"/v1/sites/{DOMAIN}", token, json={})
    _problem(wrong, 405, "method-not-allowed")
    assert "PUT" in wrong.headers["Allow"]
    _problem(api.call("GET", "/v1/sites?limit=0", token), 400, "invalid-request")
    typo = api.call("GET", "/v1/sites?expiring_in=60", token)
    assert "expiring_in" in _problem(typo, 400, "invalid-request")["detail"]  # type: ignore[operator]
    _problem(api.call("GET", "/v1/sites?cursor=%%%", token), 400, "invalid-request")


def test_renew_and_revoke_need_a_certificate(api: RunningApi) -> None:
    token = api.token("sites:write", "sites:operate", name="ops")
    api.call("PUT", f"/v1/sites/{DOMAIN}", token, json={})
    renew = api.call("POST", f"/v1/sites/{DOMAIN}/renew", token)
    assert "no certificate yet" in _problem(renew, 409, "conflict")["detail"]  # type: ignore[operator]
    revoke = api.call("POST", f"/v1/sites/{DOMAIN}/revoke", token, json={"reason": "superseded"})
    assert "no certificate to revoke" in _problem(revoke, 409, "conflict")["detail"]  # type: ignore[operator]
    bad = api.call("POST", f"/v1/sites/{DOMAIN}/revoke", token, json={"reason": "boredom"})
    _problem(bad, 400, "invalid-request")


def test_delete_publishes_a_signed_removal(api: RunningApi) -> None:
    from pipeline.crypto.signing import SignedSite

    token = api.token("sites:read", "sites:write", name="platform")
    api.call("PUT", f"/v1/sites/{DOMAIN}", token, json={"upstream": "http://10.0.0.5"})
    prefix = api.runtime.settings.redis_prefix
    redis = api.runtime.redis
    assert not SignedSite.from_json(redis.hget(f"{prefix}:signed", DOMAIN)).removed
    gone = api.call("DELETE", f"/v1/sites/{DOMAIN}", token)
    assert gone.status_code == 202 and gone.json() == {"domain": DOMAIN, "removed": True}
    statement = SignedSite.from_json(redis.hget(f"{prefix}:signed", DOMAIN))
    assert statement.removed and statement.signature
    _problem(api.call("GET", f"/v1/sites/{DOMAIN}", token), 404, "not-found")
    _problem(api.call("DELETE", f"/v1/sites/{DOMAIN}", token), 404, "not-found")


def test_batch_answers_every_line(api: RunningApi) -> None:
    token = api.token("sites:read", "sites:write", name="platform")
    api.call("PUT", "/v1/sites/there.example.com", token, json={})
    sites = [
        {"domain": "a.example.com", "upstream": "http://10.0.0.5"},
        {"domain": "b.example.com", "aliases": ["www.b.example.com"]},
        {"domain": "a.example.com", "upstream": "http://10.0.0.5"},
        {"domain": "co.uk"},
        {"domain": "c.example.com", "upstream": "http://169.254.169.254/"},
        {"domain": "there.example.com"},
        {"domain": "d.example.com", "aliases": ["www.b.example.com"]},
        "not an object",
        {"domain": "e.example.com", "colour": "red"},
    ]
    answer = api.call("POST", "/v1/sites/batch", token, json={"sites": sites})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [(r["line"], r["outcome"]) for r in results] == [
        (1, "added"), (2, "added"), (3, "duplicate"), (4, "rejected"), (5, "rejected"),
        (6, "already"), (7, "rejected"), (8, "rejected"), (9, "rejected"),
    ]  # fmt: skip
    assert "public suffix" in results[3]["reason"]
    assert "cloud metadata" in results[4]["reason"]
    assert "already belongs to site b.example.com" in results[6]["reason"]
    assert answer.json()["added"] == 2 and answer.json()["rejected"] == 5
    shown = api.call("GET", "/v1/sites/b.example.com", token).json()
    assert shown["aliases"] == ["www.b.example.com"]
    assert shown["history"][0]["actor"] == "api:platform"
    many = [{"domain": f"s{i}.example.com"} for i in range(1001)]
    too_many = api.call("POST", "/v1/sites/batch", token, json={"sites": many})
    _problem(too_many, 400, "too-many-sites")


def test_list_walks_every_site_by_keyset_pages(api: RunningApi) -> None:
    token = api.token("sites:read", "sites:write", name="platform")
    domains = sorted(f"site{i:02}.example.com" for i in range(25))
    batch = {"sites": [{"domain": d} for d in domains]}
    added = api.call("POST", "/v1/sites/batch", token, json=batch)
    assert added.json()["added"] == 25
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = api.call("GET", "/v1/sites", token, params={"limit": 10, "cursor": cursor} if cursor
                        else {"limit": 10}).json()  # fmt: skip
        pages += 1
        seen += [row["domain"] for row in page["sites"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == domains and pages == 3
    pending = api.call("GET", "/v1/sites?state=pending&limit=1000", token).json()
    assert len(pending["sites"]) == 25 and pending["next_cursor"] is None
    assert api.call("GET", "/v1/sites?state=active", token).json()["sites"] == []
    assert api.call("GET", "/v1/sites?expiring_within=86400", token).json()["sites"] == []


def test_status_is_what_certman_status_json_says(api: RunningApi) -> None:
    from pipeline.cli.commands import main

    token = api.token("sites:read", "sites:write", name="platform")
    api.call("PUT", f"/v1/sites/{DOMAIN}", token, json={})
    status = api.call("GET", "/v1/status", token)
    assert status.status_code == 200
    printed = CliRunner().invoke(main, ["status", "--json"], obj=api.runtime)
    expected = json.loads(printed.output)
    assert status.json()["sites"] == expected["sites"] == {"pending": 1}
    assert set(status.json()) == set(expected)


def test_health_metrics_and_the_contract_are_public(api: RunningApi) -> None:
    from pipeline.api.app import openapi_document

    assert api.call("GET", "/healthz").json() == {"status": "ok"}
    served = api.call("GET", "/v1/openapi.json")
    assert served.status_code == 200 and served.content == openapi_document()
    token = api.token("sites:read", name="reader")
    api.call("GET", "/v1/sites", token)
    metrics = api.call("GET", "/metrics").text
    assert 'certman_api_requests_total{method="GET",route="sites",status="200"} 1.0' in metrics
    assert token not in metrics and "reader" not in metrics
