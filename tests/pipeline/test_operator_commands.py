"""Operator commands in-process (click's runner) on real SQLite and PostgreSQL rows and the test's
Redis: domains show/update/list, renew, orders stuck, --profile, and attempts retention.

The dispatch a command asks for after its commit is recorded, not sent: the Celery app of this
process was configured before the test's settings (tests/integration/test_operator.py runs the
same commands against Pebble, workers and the edge)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from pipeline.cli.commands import main
from pipeline.distribution import layout as distribution
from pipeline.fleet import sites
from pipeline.fleet.retention import prune_attempts
from pipeline.models import Attempt, Certificate, Order, OrderStep, Site, SiteName, SiteState
from pipeline.models.base import utcnow
from tests.support.factories import make_cert, make_site
from tests.support.from_settings import session_scope, site_rules
from tests.support.http_servers import running


@pytest.fixture
def kicks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from pipeline.tasks import maintenance

    asked: list[int] = []
    monkeypatch.setattr(maintenance, "kick_dispatch", lambda: asked.append(1))
    return asked


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="certman")


def failed(result: Result, message: str) -> None:
    assert result.exit_code == 1, result.output
    assert message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def misused(result: Result, message: str) -> None:
    """click's usage error, as every command's: exit status 2 and the reason."""
    assert result.exit_code == 2 and f"Error: {message}" in result.output, result.output


def real_chain(domain: str, not_before: datetime, not_after: datetime) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Issuer R1")])
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def active_site(
    session: Session, domain: str, *aliases: str, days_left: float = 60, upstream: str | None = None
) -> Certificate:
    site = make_site(session, domain)
    site.names.extend(SiteName(name=alias) for alias in aliases)
    site.upstream = upstream
    now = utcnow()
    cert = make_cert(session, site, not_before=now - timedelta(days=90 - days_left),
                     renew_at=now + timedelta(days=days_left / 2))  # fmt: skip
    cert.chain_pem = real_chain(domain, cert.not_before, cert.not_after)
    session.flush()
    return cert


# --- domains show --------------------------------------------------------------------------------
def test_domains_show_tells_a_sites_story(certman_env: dict[str, str]) -> None:
    with session_scope() as s:
        cert = active_site(s, "dealer.example.com", "www.dealer.example.com",
                           upstream="http://10.0.0.5:8080")  # fmt: skip
        site = cert.site
        site.consecutive_failures = 1
        site.last_error = "urn:ietf:params:acme:error:connection: timeout"
        order = Order(site_id=site.id, kind="renew", step=OrderStep.CHALLENGED,
                      names=site.all_names, profile="classic", replaces=cert.ari_id,
                      exempt=True)  # fmt: skip
        s.add(order)
        s.flush()
        old = utcnow() - timedelta(hours=2)
        s.add_all([
            Attempt(site_id=site.id, order_id=order.id, step="poll_validation", outcome="failed",
                    error_type="connection", detail="timeout", created_at=old),
            Attempt(site_id=site.id, order_id=order.id, step="place_order", outcome="retry",
                    detail="badNonce", created_at=old + timedelta(hours=1)),
        ])  # fmt: skip
        order_id, serial = order.id, cert.serial
    report = json.loads(run("domains", "show", "WWW.dealer.example.com", "--json").output)
    assert report["domain"] == "dealer.example.com"
    assert report["aliases"] == ["www.dealer.example.com"]
    assert (report["state"], report["upstream"]) == ("active", "http://10.0.0.5:8080")
    certificate = report["certificate"]
    assert certificate["serial"] == serial and certificate["issuer"] == "CN=Test Issuer R1"
    assert certificate["key_type"] == "ec-p256"
    assert (certificate["scheme"], certificate["key_id"]) == ("hpke-x25519", "edge-new")
    assert report["renewal"]["reason"] == "backoff" and not report["renewal"]["due"]
    assert report["order"]["order_id"] == order_id and report["order"]["step"] == "challenged"
    assert report["order"]["task"] == "certman.issue.poll_validation"
    assert report["order"]["task_args"] == [order_id, "dealer.example.com"]
    assert (report["order"]["replaces"], report["order"]["exempt"]) == (cert.ari_id, True)
    assert report["order"]["rate_limit"] is None
    assert [(a["step"], a["outcome"], a["error_type"]) for a in report["attempts"]] == [
        ("place_order", "retry", None),
        ("poll_validation", "failed", "connection"),
    ]
    assert report["next_attempt"]["note"] == f"order {order_id} is in flight"

    text = run("domains", "show", "dealer.example.com").output
    assert "serial:" in text and serial in text and "CN=Test Issuer R1" in text
    assert "certman.issue.poll_validation" in text and "retry after 1 failed" in text
    assert f"replaces:     {cert.ari_id} (inside the CA's ARI window: spends no" in text
    assert "AT" in text and "OUTCOME" in text and "badNonce" in text
    failed(run("domains", "show", "nobody.example.com"), "not a known site")


# --- domains update ------------------------------------------------------------------------------
def _edge_record(client: redis.Redis, domain: str) -> tuple[object, ...]:
    raw = client.hget("certman:index", domain)
    assert raw is not None
    return distribution.parse_index_entry(raw)


def test_domains_update_in_place(
    certman_env: dict[str, str], redis_client: redis.Redis, kicks: list[int]
) -> None:
    with session_scope() as s:
        cert = active_site(s, "dealer.example.com", upstream="http://10.0.0.5:8080")
        active_site(s, "other.example.com")
        serial = cert.serial
    result = run("domains", "update", "dealer.example.com", "--upstream", "http://10.0.0.6:8080")
    assert result.exit_code == 0, result.output
    assert "upstream http://10.0.0.5:8080 -> http://10.0.0.6:8080" in result.output
    assert "http://10.0.0.6:8080" in _edge_record(redis_client, "dealer.example.com")
    assert kicks == []  # an upstream alone orders nothing
    with session_scope() as s:
        assert s.scalar(select(Certificate.renew_at)) > utcnow()  # type: ignore[operator]

    before = utcnow()
    result = run("domains", "update", "dealer.example.com", "--add-alias", "www.dealer.example.com",
                 "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "domain": "dealer.example.com",
        "changes": ["alias www.dealer.example.com added"],
        "new_certificate": True,
        "note": f"a new certificate is ordered; certificate {serial} is served until it arrives",
        "published": True,
    }
    assert kicks == [1]
    entry = _edge_record(redis_client, "dealer.example.com")
    assert ("dealer.example.com", "www.dealer.example.com") in entry
    with session_scope() as s:
        cert = s.scalars(select(Certificate).join(Site).where(Site.domain == "dealer.example.com"))
        [current] = [c for c in cert if c.current]
        assert current.serial == serial and current.renew_at <= utcnow()
        assert current.renew_at >= before - timedelta(seconds=1)
        assert s.scalar(select(Site.state).where(Site.domain == "dealer.example.com")) == "active"

    failed(run("domains", "update", "dealer.example.com", "--remove-alias", "dealer.example.com"),
           "primary name")  # fmt: skip
    failed(run("domains", "update", "dealer.example.com", "--add-alias", "other.example.com"),
           "other.example.com already belongs to site other.example.com")  # fmt: skip
    failed(run("domains", "update", "dealer.example.com", "--remove-alias", "x.example.com"),
           "x.example.com is not a name of dealer.example.com")  # fmt: skip
    failed(
        run("domains", "update", "dealer.example.com", "--add-alias", "--upstream", "http://x"),
        "'--upstream' looks like an option, not a domain name: give the value of --add-alias",
    )
    with session_scope() as s:
        site = s.scalar(select(Site).where(Site.domain == "dealer.example.com"))
        assert site is not None
        s.add(Order(site_id=site.id, step=OrderStep.PLACED, names=site.all_names))
    failed(
        run("domains", "update", "dealer.example.com", "--remove-alias", "www.dealer.example.com"),
        "has an order in flight (step placed)",
    )
    # Re-adding with another upstream changes nothing and points to update.
    failed(run("domains", "add", "other.example.com", "--upstream", "http://10.0.0.7"),
           "change it with certman domains update")  # fmt: skip


# --- renew ---------------------------------------------------------------------------------------
def test_renew_now_all_and_their_errors(certman_env: dict[str, str], kicks: list[int]) -> None:
    with session_scope() as s:
        for i in range(4):
            active_site(s, f"s{i}.example.com", days_left=60 - i)
        make_site(s, "new.example.com", state=SiteState.PENDING)
    result = run("renew", "s1.example.com", "s0.example.com", "--now", "--json")
    assert result.exit_code == 0, result.output
    assert [row["domain"] for row in json.loads(result.output)] == ["s0.example.com",
                                                                      "s1.example.com"]  # fmt: skip
    assert kicks == [1]
    with session_scope() as s:
        due = s.scalars(select(Site.domain).join(Certificate).where(
            Certificate.renew_at <= utcnow()).order_by(Site.domain)).all()  # fmt: skip
    assert due == ["s0.example.com", "s1.example.com"]

    failed(run("renew", "new.example.com", "--now"), "new.example.com has no certificate yet")
    misused(run("renew", "s0.example.com"), "name the sites and say --now")
    failed(
        run("renew", "--key-id", "deadbeef", "--within", "1d"),
        "no current certificate is sealed to key 'deadbeef' (key ids in use: edge-new)",
    )
    misused(run("renew", "--all"), "--within says over how long")
    misused(
        run("renew", "--all", "--key-id", "k", "--within", "1d"),
        "give NAME... --now, or exactly one",
    )
    failed(run("renew", "--now", "--", "-s0.example.com"), "looks like an option")

    now = utcnow()
    result = run("renew", "--all", "--within", "2d")
    assert result.exit_code == 0 and result.output.startswith("4 certificates (every certificate)")
    with session_scope() as s:
        rows = s.execute(select(Certificate.not_after, Certificate.renew_at)
                         .order_by(Certificate.not_after)).all()  # fmt: skip
    # Soonest expiry first (s3, s2, s1, s0) at 0, 12, 24 and 36 hours; never later than it was:
    # s1 and s0, made due by --now, stay due.
    at = [renew_at for _, renew_at in rows]
    assert at[0] - now < timedelta(minutes=1)
    assert timedelta(hours=11) < at[1] - at[0] < timedelta(hours=13)
    assert at[2] <= now and at[3] <= now


# --- listings ------------------------------------------------------------------------------------
def test_listings_have_headers_say_empty_filter_and_stream(
    certman_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run("domains", "list").output == "no sites\n"
    assert run("domains", "list", "--json").output == "[]\n"
    assert run("orders", "stuck").output.startswith("no stuck orders (none untouched for longer")
    with session_scope() as s:
        active_site(s, "b.example.com", "www.b.example.com", days_left=5)
        active_site(s, "a.example.com", days_left=40)
        make_site(s, "c.example.com", state=SiteState.RETRYING, failures=2)
        make_site(s, "d.example.com", state=SiteState.PENDING)
    monkeypatch.setattr(sites, "LIST_BATCH", 2)  # several batches of keyset pagination
    with session_scope() as s:
        whole = sites.list_sites(s)
        assert [r["domain"] for r in whole] == ["a.example.com", "b.example.com",
                                                 "c.example.com", "d.example.com"]  # fmt: skip
    streamed = run("domains", "list", "--json").output
    assert streamed == json.dumps(whole, indent=2) + "\n"  # the same bytes as the whole list
    text = run("domains", "list").output.splitlines()
    assert text[0].split() == ["STATE", "EXPIRES", "RENEWS", "ALIASES", "DOMAIN"]
    assert [line.split()[-1] for line in text[1:3]] == ["a.example.com", "b.example.com"]
    assert "(boom)" in text[3]
    assert len({line.index("example.com") - len(line.split()[-1]) for line in text[1:3]}) <= 2

    def domains(*args: str) -> list[str]:
        return [r["domain"] for r in json.loads(run("domains", "list", "--json", *args).output)]

    assert domains("--state", "retrying") == ["c.example.com"]
    assert domains("--expiring-within", "10d") == ["b.example.com"]
    assert domains("--expiring-within", "10d", "--state", "pending") == []
    assert run("domains", "list", "--state", "blocked").output == "no sites match\n"

    with session_scope() as s:
        site = s.scalar(select(Site).where(Site.domain == "d.example.com"))
        assert site is not None
        order = Order(site_id=site.id, step=OrderStep.PLACED, names=["d.example.com"])
        order.touched_at = utcnow() - timedelta(hours=3)
        s.add(order)
    lines = run("orders", "stuck").output.splitlines()
    assert lines[0].split() == ["ORDER", "STEP", "KIND", "AGE", "TRIES", "ATTEMPTS", "DOMAIN"]
    assert lines[1].split()[1] == "placed" and lines[1].endswith("d.example.com")


# --- profiles the CA offers ----------------------------------------------------------------------
@pytest.fixture
def directory_url() -> Iterator[str]:
    """A CA directory over real HTTP on loopback, offering two profiles."""
    body = json.dumps({"newOrder": "http://x/new-order", "meta": {"profiles": {
        "classic": "90 days", "shortlived": "6 days"}}}).encode()  # fmt: skip

    class Directory(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    with running(ThreadingHTTPServer(("127.0.0.1", 0), Directory)) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}/directory"


def test_a_profile_the_ca_does_not_offer_is_refused(
    certman_env: dict[str, str],
    directory_url: str,
    monkeypatch: pytest.MonkeyPatch,
    redis_client: redis.Redis,
    kicks: list[int],
) -> None:
    from pipeline import runtime

    monkeypatch.setenv("CERTMAN_ACME_DIRECTORY", directory_url)
    runtime.reset(close=True, settings=True)
    failed(run("domains", "add", "a.example.com", "--profile", "shortlivd"),
           f"profile 'shortlivd' is not offered by the CA at {directory_url}: one of classic, "
           "shortlived")  # fmt: skip
    result = run("domains", "add", "a.example.com", "--profile", "shortlived")
    assert result.exit_code == 0, result.output
    failed(run("domains", "update", "a.example.com", "--profile", "tlsserver"), "not offered")
    with session_scope() as s:
        assert s.scalar(select(Site.profile)) == "shortlived"


# --- retention -----------------------------------------------------------------------------------
def test_old_attempts_are_pruned_in_batches_and_recent_ones_stay(
    store: Callable[[], AbstractContextManager[Session]],
) -> None:
    now = datetime(2026, 3, 1, tzinfo=UTC)
    with store() as s:
        site = make_site(s, "dealer.example.com")
        s.add_all(
            Attempt(site_id=site.id, step="place_order", outcome="failed",
                    created_at=now - timedelta(days=age))
            for age in (400, 120, 91, 91, 89, 10, 0)
        )  # fmt: skip
    deleted = prune_attempts(store, before=now - timedelta(days=90), batch=2)
    assert deleted == 4
    with store() as s:
        left = s.scalars(select(Attempt.created_at).order_by(Attempt.created_at)).all()
        assert [(now - at).days for at in left] == [89, 10, 0]
    assert prune_attempts(store, before=now - timedelta(days=90), batch=2) == 0
    # A bounded run stops after max_batches, the next one carries on.
    assert prune_attempts(store, before=now, batch=1, max_batches=2) == 2
    with store() as s:
        assert s.scalar(select(func.count()).select_from(Attempt)) == 1


def test_retention_is_scheduled_by_beat() -> None:
    from pipeline import celeryconfig

    entry = celeryconfig.beat_schedule["prune-attempts"]
    assert entry["task"] == "certman.maintenance.prune_attempts"
    assert isinstance(entry["schedule"], timedelta) and entry["schedule"] <= timedelta(days=1)


# --- a site's issuer -----------------------------------------------------------------------------
def test_a_site_prefers_an_issuer_from_add_or_update(
    certman_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, kicks: list[int]
) -> None:
    from pipeline import runtime

    monkeypatch.setenv("CERTMAN_ISSUERS", "primary,second")
    monkeypatch.setenv("CERTMAN_ISSUER_PRIMARY_DIRECTORY", "https://ca-one.invalid/dir")
    monkeypatch.setenv("CERTMAN_ISSUER_SECOND_DIRECTORY", "https://ca-two.invalid/dir")
    runtime.reset(close=True, settings=True)
    unknown = "issuer 'third' is not configured (CERTMAN_ISSUERS): one of primary, second"
    failed(run("domains", "add", "a.example.com", "--issuer", "third"), unknown)
    assert run("domains", "add", "a.example.com", "--issuer", "second").exit_code == 0
    assert run("domains", "add", "b.example.com").exit_code == 0
    done = run("domains", "update", "b.example.com", "--issuer", "second", "--json")
    assert json.loads(done.output)["changes"] == ["issuer (first) -> second"]
    failed(run("domains", "update", "b.example.com", "--issuer", "nope"), "issuer 'nope'")
    shown = json.loads(run("domains", "show", "b.example.com", "--json").output)
    assert shown["preferred_issuer"] == "second"
    with session_scope() as s:
        preferred = dict(s.execute(select(Site.domain, Site.preferred_issuer)).tuples().all())
    assert preferred == {"a.example.com": "second", "b.example.com": "second"}


# --- why a step waits, and what ARI said ---------------------------------------------------------
def test_domains_show_names_the_limiter_bucket_a_step_waits_on(
    certman_env: dict[str, str], redis_client: redis.Redis, edge_public_key: Path
) -> None:
    from pipeline.errors import RateLimited
    from pipeline.fleet.dispatch import start_due
    from pipeline.issuance import OrderSteps
    from pipeline.runtime import Runtime
    from pipeline.settings import Settings
    from tests.support.fake_acme import FakeCA, RecordingPublisher

    # One new order an hour: the second site's place_order waits on the real limiter in Redis.
    config = Settings(edge_public_key=edge_public_key, self_check=False, limit_new_orders="1/1h")
    ca = FakeCA()
    steps = OrderSteps(Runtime(config, acme=ca, publisher=RecordingPublisher()))  # type: ignore[arg-type]
    with session_scope() as s:
        sites.add_site(s, sites.parse_site("first.example.com", rules=site_rules()))
        sites.add_site(s, sites.parse_site("second.example.com", rules=site_rules()))
        first, second = sorted(started.order_id for started in start_due(s, limit=10))
    steps.place_order(first)
    with pytest.raises(RateLimited) as waits:
        steps.place_order(second)
    steps.note_retry(second, "place_order", waits.value)  # what the task does, then retries
    bucket = f"new-orders:{ca.account_uri}"
    assert waits.value.bucket == bucket

    order = json.loads(run("domains", "show", "second.example.com", "--json").output)["order"]
    assert order["step"] == "queued" and order["rate_limit"]["bucket"] == bucket
    assert 3000 < order["rate_limit"]["wait_seconds"] <= 3600
    assert order["rate_limit"]["reason"] == f"waiting for rate limit {bucket}"
    text = run("domains", "show", "second.example.com").output
    assert f"  waiting:      rate limit bucket {bucket} until" in text
    assert (
        json.loads(run("domains", "show", "first.example.com", "--json").output)["order"][
            "rate_limit"
        ]
        is None
    )

    # The bucket refills (here: emptied by hand): the step proceeds and the wait is cleared.
    redis_client.delete(*redis_client.keys("certman:rl:*"))
    steps.place_order(second)
    order = json.loads(run("domains", "show", "second.example.com", "--json").output)["order"]
    assert order["step"] == "placed" and order["rate_limit"] is None
    assert "rate limit bucket" not in run("domains", "show", "second.example.com").output


def test_domains_show_says_what_ari_said_and_why_it_is_not_used(
    certman_env: dict[str, str],
) -> None:
    from pipeline.errors import AttemptFailed
    from pipeline.fleet import renewal

    now = utcnow()
    with session_scope() as s:
        for name in ("window", "late", "past", "none", "error", "unasked"):
            active_site(s, f"{name}.example.com", days_left=60)
    nb = now - timedelta(days=30)
    answers = {
        "window.example.com": (now - timedelta(hours=1), now + timedelta(days=1)),
        "late.example.com": (nb + timedelta(days=89), nb + timedelta(days=91)),
        "past.example.com": (now - timedelta(hours=2), now - timedelta(hours=1)),
        "none.example.com": None,
    }

    def window_for(chain: bytes) -> tuple[datetime, datetime] | None:
        leaf = x509.load_pem_x509_certificate(chain)
        domain = str(leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
        if domain == "unasked.example.com":
            raise AssertionError("limited to the batch")
        if domain == "error.example.com":
            raise AttemptFailed("the CA does not know this certificate")
        return answers[domain]

    with session_scope() as s:
        s.execute(update(Certificate).where(Certificate.serial != "").values(ari_checked_at=None))
        unasked = s.scalar(select(Certificate.id).join(Site).where(
            Site.domain == "unasked.example.com"))  # fmt: skip
        s.execute(update(Certificate).where(Certificate.id == unasked).values(ari_checked_at=now))
    renewal.refresh_ari(session_scope, window_for, now=now, period=timedelta(hours=12), limit=10)
    with session_scope() as s:  # as if never asked
        s.execute(update(Certificate).where(Certificate.id == unasked).values(ari_checked_at=None))

    def ari(name: str) -> dict[str, Any]:
        report = json.loads(run("domains", "show", name, "--json").output)
        return report["renewal"]["ari"]  # type: ignore[no-any-return]

    window = ari("window.example.com")
    assert window["status"] == "window" and window["exempt_now"]
    assert "the renewal is scheduled inside it" in window["why"]
    late = ari("late.example.com")
    assert (late["status"], late["window"], late["exempt_now"]) == (
        "ends_after_expiry", None, False)  # fmt: skip
    assert late["offered"].startswith((nb + timedelta(days=89)).isoformat()[:16])
    assert "ends after the certificate expires: ignored, lifetime rule" in late["why"]
    past = ari("past.example.com")
    assert past["status"] == "window_past" and "renew now" in past["why"]
    assert not past["exempt_now"]
    assert ari("none.example.com")["status"] == "no_ari"
    assert "offers no ARI" in ari("none.example.com")["why"]
    error = ari("error.example.com")
    assert error["status"] == "error" and error["error"] == "the CA does not know this certificate"
    assert ari("unasked.example.com")["status"] is None
    assert "not asked yet" in ari("unasked.example.com")["why"]

    text = run("domains", "show", "late.example.com").output
    assert "ARI:" in text and "ignored, lifetime rule" in text
    assert "no issuance tokens spent" in run("domains", "show", "window.example.com").output
