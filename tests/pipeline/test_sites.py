from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pipeline.fleet.sites import SiteError, add_site, list_sites, parse_site, remove_site
from pipeline.models import Order, OrderStep, Site, SiteName, SiteState
from pipeline.names import InvalidName
from tests.support.from_settings import session_scope, site_rules


def count(url: str, model: type) -> int:
    with session_scope(url) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_add_stores_site_with_every_name(database_url: str) -> None:
    new = parse_site(
        "Dealer.example.com", ["WWW.dealer.example.com", "dealer.example.com"], rules=site_rules()
    )
    assert new.names == ("dealer.example.com", "www.dealer.example.com")
    with session_scope(database_url) as session:
        site, created = add_site(session, new)
        assert created and site.state == SiteState.PENDING and site.next_attempt_at
    with session_scope(database_url) as session:
        rows = list_sites(session)
    assert rows == [
        {
            "domain": "dealer.example.com",
            "aliases": ["www.dealer.example.com"],
            "state": "pending",
            "not_after": None,
            "renew_at": None,
            "serial": None,
            "upstream": None,
            "last_error": None,
            "next_attempt_at": rows[0]["next_attempt_at"],
        }
    ]


def test_adding_again_is_a_no_op_and_never_changes_the_upstream(database_url: str) -> None:
    with session_scope(database_url) as session:
        add_site(
            session,
            parse_site("dealer.example.com", upstream="http://10.0.0.5:8080", rules=site_rules()),
        )
    with session_scope(database_url) as session:
        site, created = add_site(session, parse_site("dealer.example.com", rules=site_rules()))
        assert not created and site.upstream == "http://10.0.0.5:8080"
    with (
        pytest.raises(SiteError, match=r"upstream http://10.0.0.5:8080, not http://10.1.1.1:8080"
                      r": change it with certman domains update"),
        session_scope(database_url) as session,
    ):  # fmt: skip
        add_site(
            session,
            parse_site("dealer.example.com", upstream="http://10.1.1.1:8080/", rules=site_rules()),
        )
    with session_scope(database_url) as session:
        assert session.scalar(select(Site.upstream)) == "http://10.0.0.5:8080"
    assert count(database_url, Site) == 1


def test_a_name_of_another_site_is_refused_and_nothing_written(database_url: str) -> None:
    with session_scope(database_url) as session:
        add_site(
            session,
            parse_site("dealer.example.com", ["www.dealer.example.com"], rules=site_rules()),
        )
    with (
        pytest.raises(
            SiteError, match="www.dealer.example.com already belongs to site dealer.example.com"
        ),
        session_scope(database_url) as session,
    ):
        add_site(
            session, parse_site("other.example.com", ["www.dealer.example.com"], rules=site_rules())
        )
    assert count(database_url, Site) == 1
    assert count(database_url, SiteName) == 2


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"domain": "*.x.com"}, InvalidName),
        ({"domain": "ok.example.com", "aliases": ["bad_alias.com"]}, InvalidName),
        ({"domain": "ok.example.com", "upstream": "ftp://x"}, SiteError),
        ({"domain": "ok.example.com", "upstream": "http://x/?q=1"}, SiteError),
    ],
)
def test_bad_requests_are_refused(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_site(**kwargs, rules=site_rules())  # type: ignore[arg-type]


def test_remove_by_alias_cancels_orders_and_deletes_names(database_url: str) -> None:
    with session_scope(database_url) as session:
        site, _ = add_site(
            session,
            parse_site("dealer.example.com", ["www.dealer.example.com"], rules=site_rules()),
        )
        session.add(Order(site_id=site.id, names=site.all_names, step=OrderStep.PLACED))
    with session_scope(database_url) as session:
        removed = remove_site(session, "WWW.dealer.example.com")
        assert removed.domain == "dealer.example.com"
    assert count(database_url, Site) == 0
    assert count(database_url, SiteName) == 0
    assert count(database_url, Order) == 0


def test_remove_unknown_says_so(database_url: str) -> None:
    with pytest.raises(SiteError, match="not a known site"), session_scope(database_url) as session:
        remove_site(session, "nobody.example.com")


def test_a_site_may_choose_its_key_type_and_profile(database_url: str) -> None:
    with pytest.raises(SiteError, match="key type 'dsa'"):
        parse_site("dealer.example.com", key_type="dsa", rules=site_rules())
    new = parse_site(
        "dealer.example.com", key_type="rsa-2048", profile="shortlived", rules=site_rules()
    )
    with session_scope(database_url) as session:
        site, _ = add_site(session, new)
        assert (site.key_type, site.profile) == ("rsa-2048", "shortlived")


# --- upstreams: the outbound policy (pipeline.outbound) ------------------------------------------
@pytest.fixture
def upstream_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Settings read afresh from the environment this test sets."""
    from pipeline.settings import get_settings

    for var in ("CERTMAN_UPSTREAM_ALLOW_LINK_LOCAL", "CERTMAN_UPSTREAM_ALLOWED_NETWORKS"):
        monkeypatch.delenv(var, raising=False)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


@pytest.mark.parametrize(
    ("upstream", "reason"),
    [
        ("http://user@dealer.example.com/", "must not contain a user name or password"),
        ("http://169.254.169.254/", "cloud metadata service"),
        ("http://169.254.169.254./", "cloud metadata service"),
        ("http://[::ffff:169.254.169.254]/", "IPv4-mapped 169.254.169.254"),
        ("http://[64:ff9b::a9fe:a9fe]/", "NAT64 169.254.169.254"),
        ("http://[fd00:ec2::254]/", "AWS instance metadata service"),
        ("http://100.100.100.200/", "Alibaba Cloud metadata service"),
        ("http://169.254.20.1:8080/", "link-local (169.254.0.0/16)"),
        ("http://[fe80::2]/", "link-local (fe80::/10)"),
        ("http://2852039166/", "non-standard form"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://dealer.example.com:99999/", "port must be a number"),
    ],
)
def test_upstreams_the_edge_must_not_reach_are_refused(
    upstream_env: pytest.MonkeyPatch, upstream: str, reason: str
) -> None:
    with pytest.raises(SiteError) as caught:
        parse_site("dealer.example.com", upstream=upstream, rules=site_rules())
    assert str(caught.value).startswith(f"upstream {upstream!r}: ")
    assert reason in str(caught.value)


def test_private_and_loopback_upstreams_stay_allowed(upstream_env: pytest.MonkeyPatch) -> None:
    for upstream in ("http://10.0.0.5:8080/", "http://192.168.1.2", "https://[fd00::5]/",
                     "http://127.0.0.1:3000", "https://Dealer-Host.internal/site/"):  # fmt: skip
        assert (
            parse_site("dealer.example.com", upstream=upstream, rules=site_rules()).upstream
            is not None
        )
    assert (
        parse_site(
            "dealer.example.com", upstream="HTTPS://Dealer-Host.internal/site/", rules=site_rules()
        ).upstream
        == "https://dealer-host.internal/site"
    )


def test_link_local_upstreams_when_the_installation_allows_them(
    upstream_env: pytest.MonkeyPatch,
) -> None:
    upstream_env.setenv("CERTMAN_UPSTREAM_ALLOW_LINK_LOCAL", "on")
    assert parse_site(
        "d.example.com", upstream="http://169.254.20.1/", rules=site_rules()
    ).upstream == ("http://169.254.20.1")
    with pytest.raises(SiteError, match="cloud metadata service"):
        parse_site("d.example.com", upstream="http://169.254.169.254/", rules=site_rules())


def test_an_allow_list_limits_ip_literal_upstreams(upstream_env: pytest.MonkeyPatch) -> None:
    upstream_env.setenv("CERTMAN_UPSTREAM_ALLOWED_NETWORKS", "10.20.0.0/16, fd00:20::/32")
    assert (
        parse_site("d.example.com", upstream="http://10.20.3.4/", rules=site_rules()).upstream
        == "http://10.20.3.4"
    )
    with pytest.raises(SiteError, match=r"outside CERTMAN_UPSTREAM_ALLOWED_NETWORKS \(10\.20"):
        parse_site("d.example.com", upstream="http://10.30.3.4/", rules=site_rules())


def test_bulk_onboarding_rejects_a_line_whose_upstream_is_refused(
    upstream_env: pytest.MonkeyPatch, database_url: str, tmp_path: Path
) -> None:
    """Onboarding validates each line with parse_site, so it refuses what the CLI refuses."""
    from pipeline.db import get_engine
    from pipeline.fleet.onboarding import Onboarding, Options, RejectedWriter, read_lines

    text = (
        "good.example.com,http://10.0.0.5:8080\n"
        "metadata.example.com,http://169.254.169.254/latest\n"
        "creds.example.com,http://admin:pw@10.0.0.6/\n"
    )
    rejected = tmp_path / "in.rejected.csv"
    writer = RejectedWriter(rejected)
    try:
        summary = Onboarding(
            get_engine(database_url), Options(rules=site_rules()), rejected=writer
        ).run(read_lines(io.StringIO(text)))
    finally:
        writer.close()
    assert (summary.added, summary.rejected) == (1, 2)
    refused = rejected.read_text()
    assert "cloud metadata service" in refused
    assert "user name or password" in refused
    with session_scope(database_url) as session:
        assert [row["domain"] for row in list_sites(session)] == ["good.example.com"]
