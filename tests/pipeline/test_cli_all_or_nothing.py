"""``certman domains add``, ``update`` and ``remove`` finish (the row and its signed publication)
or leave nothing, whatever fails on the way, and a re-run does what the failed run should have.

Through the installed command, against the test's store and Redis: the signing key unreadable,
Redis down, the edge key unreadable, the commit itself refused after the publication, and a
site an older version left stored but never published.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import select

from pipeline.crypto.signing import SignedSite
from pipeline.crypto.signing_key_file import peek_signing_key
from pipeline.fleet.sites import add_site, parse_site
from pipeline.models import Site
from tests.pipeline.test_cli import certman
from tests.support.from_settings import session_scope, site_rules

DOMAIN = "dealer.example.com"
# Nothing listens here: connection refused at once.
REDIS_DOWN = "redis://127.0.0.1:1/0"


@pytest.fixture
def env(certman_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return certman_env | {"CERTMAN_PIPELINE_KEY": str(tmp_path / "pipeline.key")}


def stored() -> dict[str, str | None]:
    """Every site in the store: domain -> upstream."""
    with session_scope() as session:
        return dict(session.execute(select(Site.domain, Site.upstream)).tuples().all())


def on_edges(client: redis.Redis, domain: str) -> SignedSite | None:
    """What the edges believe of ``domain``: its signed statement, if its index entry is there
    too (a tombstone has no index entry)."""
    raw = client.hget("certman:signed", domain)
    if raw is None:
        return None
    statement = SignedSite.from_json(raw)
    assert (client.hget("certman:index", domain) is None) == statement.removed
    return statement


def failed_in_one_line(result: object, *needles: str) -> None:
    assert result.returncode == 1, result.stdout  # type: ignore[attr-defined]
    err: str = result.stderr  # type: ignore[attr-defined]
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def served_by_our_key(statement: SignedSite | None, tmp_path: Path) -> None:
    key = peek_signing_key(tmp_path / "signing.key")
    assert statement is not None and not statement.removed
    assert key is not None and statement.signer == key.key_id


def test_an_unreadable_signing_key_leaves_no_site(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    key_id = certman(env, "keys", "generate", "--purpose", "signing", "--dir", str(keys))
    key = keys / f"{key_id.stdout.strip()}.key"
    key.chmod(0o644)
    signing = env | {"CERTMAN_SIGNING_KEY": str(key)}
    failed_in_one_line(certman(signing, "domains", "add", DOMAIN), str(key), "chmod 600")
    assert stored() == {} and on_edges(redis_client, DOMAIN) is None

    key.chmod(0o600)
    again = certman(signing, "domains", "add", DOMAIN)
    assert again.returncode == 0 and again.stdout.strip() == f"added {DOMAIN}; issuance queued"
    assert stored() == {DOMAIN: None}
    statement = on_edges(redis_client, DOMAIN)
    assert statement is not None and statement.signer == key_id.stdout.strip()


def test_redis_down_leaves_no_site_and_no_change(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    down = env | {"CERTMAN_REDIS_URL": REDIS_DOWN}
    failed_in_one_line(certman(down, "domains", "add", DOMAIN), "Redis unavailable")
    assert stored() == {} and on_edges(redis_client, DOMAIN) is None

    added = certman(env, "domains", "add", DOMAIN, "--upstream", "http://10.0.0.5:8080")
    assert added.returncode == 0, added.stderr
    served_by_our_key(on_edges(redis_client, DOMAIN), tmp_path)

    # An update that cannot reach the edges is not made either.
    upstream = ("domains", "update", DOMAIN, "--upstream", "http://10.0.0.6:8080")
    failed_in_one_line(certman(down, *upstream), "Redis unavailable")
    assert stored() == {DOMAIN: "http://10.0.0.5:8080"}
    assert on_edges(redis_client, DOMAIN).upstream == "http://10.0.0.5:8080"  # type: ignore[union-attr]
    updated = certman(env, *upstream)
    assert updated.returncode == 0 and "-> http://10.0.0.6:8080" in updated.stdout
    assert stored() == {DOMAIN: "http://10.0.0.6:8080"}
    assert on_edges(redis_client, DOMAIN).upstream == "http://10.0.0.6:8080"  # type: ignore[union-attr]

    # Nor a removal: the edges would go on serving a site the store no longer has.
    failed_in_one_line(certman(down, "domains", "remove", DOMAIN), "Redis unavailable")
    assert list(stored()) == [DOMAIN]
    served_by_our_key(on_edges(redis_client, DOMAIN), tmp_path)
    removed = certman(env, "domains", "remove", DOMAIN)
    assert removed.returncode == 0 and stored() == {}
    assert on_edges(redis_client, DOMAIN).removed  # type: ignore[union-attr]


def test_an_unreadable_edge_key_refuses_the_site_before_anything_is_written(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    bad = tmp_path / "edge.pub"
    bad.write_text("not a key\n")
    edge = env | {"CERTMAN_EDGE_PUBLIC_KEY": str(bad)}
    failed_in_one_line(
        certman(edge, "domains", "add", DOMAIN), "CERTMAN_EDGE_PUBLIC_KEY", str(bad),
        "nothing was added",
    )  # fmt: skip
    assert stored() == {} and on_edges(redis_client, DOMAIN) is None
    missing = env | {"CERTMAN_EDGE_PUBLIC_KEY": str(tmp_path / "absent.pub")}
    failed_in_one_line(certman(missing, "domains", "add", DOMAIN), "absent.pub")
    assert stored() == {}

    key_id = certman(env, "keys", "generate", "--dir", str(tmp_path / "edge")).stdout.strip()
    good = env | {"CERTMAN_EDGE_PUBLIC_KEY": str(tmp_path / "edge" / f"{key_id}.pub")}
    assert certman(good, "domains", "add", DOMAIN).returncode == 0
    served_by_our_key(on_edges(redis_client, DOMAIN), tmp_path)
    # A change that wants a new certificate is refused the same way; an upstream alone is not.
    failed_in_one_line(
        certman(edge, "domains", "update", DOMAIN, "--add-alias", f"www.{DOMAIN}"),
        "nothing was changed",
    )
    assert certman(good, "domains", "list", "--json").stdout.count(f"www.{DOMAIN}") == 0
    assert (
        certman(edge, "domains", "update", DOMAIN, "--upstream", "http://10.0.0.7").returncode == 0
    )


@pytest.fixture
def refusing_commit(database_url: str) -> Iterator[None]:
    """PostgreSQL refusing every new site at COMMIT (a deferred constraint trigger): the one
    failure that comes after the publication."""
    engine = sa.create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(sa.text(
            "CREATE OR REPLACE FUNCTION certman_test_refuse() RETURNS trigger LANGUAGE plpgsql "
            "AS $$ BEGIN RAISE EXCEPTION 'new sites refused at commit (test)'; END $$"
        ))  # fmt: skip
        connection.execute(sa.text(
            "CREATE CONSTRAINT TRIGGER certman_test_refuse AFTER INSERT ON sites "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION certman_test_refuse()"
        ))  # fmt: skip
    try:
        yield
    finally:
        with engine.begin() as connection:
            connection.execute(sa.text("DROP TRIGGER IF EXISTS certman_test_refuse ON sites"))
            connection.execute(sa.text("DROP FUNCTION IF EXISTS certman_test_refuse()"))
        engine.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_commit_refused_after_the_publication_takes_the_site_off_the_edges(
    env: dict[str, str], redis_client: redis.Redis, refusing_commit: None
) -> None:
    result = certman(env, "domains", "add", DOMAIN)
    failed_in_one_line(result, "the database refused the change", "refused at commit")
    assert stored() == {}
    # Published before the commit, then put back to what the store holds: nothing, signed.
    assert on_edges(redis_client, DOMAIN).removed  # type: ignore[union-attr]


def test_a_site_stored_but_never_published_is_published_by_the_re_add(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    # What an older certman left after a failed publication: the row, and nothing on the edges.
    with session_scope() as session:
        add_site(session, parse_site(DOMAIN, upstream="http://10.0.0.5:8080", rules=site_rules()))
    again = certman(env, "domains", "add", DOMAIN, "--upstream", "http://10.0.0.5:8080")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"{DOMAIN} already there; published to the edges again"
    served_by_our_key(on_edges(redis_client, DOMAIN), tmp_path)
    version = redis_client.get("certman:version")
    # Done now: a third run publishes nothing, and says only that it is there.
    third = certman(env, "domains", "add", DOMAIN)
    assert third.returncode == 0 and third.stdout.strip() == f"{DOMAIN} already there"
    assert redis_client.get("certman:version") == version
    # domains update finishes an interrupted update the same way.
    redis_client.hdel("certman:index", DOMAIN)
    redis_client.hdel("certman:signed", DOMAIN)
    update = certman(env, "domains", "update", DOMAIN, "--upstream", "http://10.0.0.5:8080",
                     "--json")  # fmt: skip
    assert update.returncode == 0, update.stderr
    assert json.loads(update.stdout)["published"] is True
    served_by_our_key(on_edges(redis_client, DOMAIN), tmp_path)
    version = redis_client.get("certman:version")
    nothing = certman(env, "domains", "update", DOMAIN, "--upstream", "http://10.0.0.5:8080")
    assert nothing.stdout.strip() == f"{DOMAIN}: nothing to change"
    assert redis_client.get("certman:version") == version


def test_a_broker_that_cannot_take_the_dispatch_kick_leaves_the_site_done(
    env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    # The site is stored and published before the kick: a broker that refuses it costs only
    # the wait for beat's next dispatch, and says so.
    config = tmp_path / "celery_broker_down.py"
    config.write_text(
        f"from pipeline.celeryconfig import *  # noqa: F403\nbroker_url = {REDIS_DOWN!r}\n"
    )
    result = certman(env | {"CERTMAN_CELERY_CONFIG": str(config)}, "domains", "add", DOMAIN)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"added {DOMAIN}; issuance queued"
    note = result.stderr.strip().splitlines()
    assert len(note) == 1 and "dispatch not asked for now" in note[0], result.stderr
    assert "beat's dispatcher starts it at its next tick" in note[0]
    assert stored() == {DOMAIN: None}
    served_by_our_key(on_edges(redis_client, DOMAIN), tmp_path)


def test_a_redis_user_that_may_not_publish_leaves_no_site(
    env: dict[str, str], redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # The env file naming the edges' read-only Redis user, say: refused, in one line.
    user, password = f"certman-readonly-{tmp_path.name[-8:]}", "test-password"
    redis_client.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"],
                             commands=["+@read", "+@connection"])  # fmt: skip
    try:
        host = redis_url.split("://", 1)[1]
        readonly = env | {"CERTMAN_REDIS_URL": f"redis://{user}:{password}@{host}"}
        failed_in_one_line(certman(readonly, "domains", "add", DOMAIN), "Redis refused")
        assert stored() == {} and on_edges(redis_client, DOMAIN) is None
    finally:
        redis_client.acl_deluser(user)
    assert certman(env, "domains", "add", DOMAIN).returncode == 0
    served_by_our_key(on_edges(redis_client, DOMAIN), tmp_path)
