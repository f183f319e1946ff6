from __future__ import annotations

import pytest
from sqlalchemy import func, select

from pipeline.db import session_scope
from pipeline.models import Order, OrderStep, Site, SiteName, SiteState
from pipeline.names import InvalidName
from pipeline.sites import SiteError, add_site, list_sites, parse_site, remove_site


def count(url: str, model: type) -> int:
    with session_scope(url) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_add_stores_site_with_every_name(database_url: str) -> None:
    new = parse_site("Dealer.example.com", ["WWW.dealer.example.com", "dealer.example.com"])
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


def test_adding_again_is_a_no_op_that_may_update_upstream(database_url: str) -> None:
    with session_scope(database_url) as session:
        add_site(session, parse_site("dealer.example.com"))
    with session_scope(database_url) as session:
        site, created = add_site(
            session, parse_site("dealer.example.com", upstream="http://10.1.1.1:8080/")
        )
        assert not created
        assert site.upstream == "http://10.1.1.1:8080"
    assert count(database_url, Site) == 1


def test_a_name_of_another_site_is_refused_and_nothing_written(database_url: str) -> None:
    with session_scope(database_url) as session:
        add_site(session, parse_site("dealer.example.com", ["www.dealer.example.com"]))
    with (
        pytest.raises(
            SiteError, match="www.dealer.example.com already belongs to site dealer.example.com"
        ),
        session_scope(database_url) as session,
    ):
        add_site(session, parse_site("other.example.com", ["www.dealer.example.com"]))
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
        parse_site(**kwargs)  # type: ignore[arg-type]


def test_remove_by_alias_cancels_orders_and_deletes_names(database_url: str) -> None:
    with session_scope(database_url) as session:
        site, _ = add_site(session, parse_site("dealer.example.com", ["www.dealer.example.com"]))
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
        parse_site("dealer.example.com", key_type="dsa")
    new = parse_site("dealer.example.com", key_type="rsa-2048", profile="shortlived")
    with session_scope(database_url) as session:
        site, _ = add_site(session, new)
        assert (site.key_type, site.profile) == ("rsa-2048", "shortlived")
