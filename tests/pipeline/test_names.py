from __future__ import annotations

import pytest

from pipeline.names import InvalidName, normalise, registered_domain


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Example.COM.", "example.com"),
        ("  www.example.co.uk ", "www.example.co.uk"),
        ("bücher.de", "xn--bcher-kva.de"),
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("BÜCHER.de", "xn--bcher-kva.de"),
        ("dealer.github.io", "dealer.github.io"),
    ],
)
def test_normalises_to_lower_case_a_labels(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("a" * 64 + ".com", "longer than 63"),
        (("a" * 50 + ".") * 5 + "com", "253"),
        ("-dealer.com", "hyphen"),
        ("dealer-.com", "hyphen"),
        ("*.dealer.com", "wildcard"),
        ("192.0.2.7", "IP address"),
        ("[2001:db8::1]", "IP address"),
        ("dealer_one.com", "valid domain name"),
        ("dealer one.com", "valid domain name"),
        ("x..com", "valid domain name"),
        ("co.uk", "public suffix itself"),
        ("github.io", "public suffix itself"),
        ("com", "fully qualified"),
        ("dealer.notatld", "not a known public suffix"),
    ],
)
def test_rejects_with_a_reason(raw: str, reason: str) -> None:
    with pytest.raises(InvalidName) as excinfo:
        normalise(raw)
    assert reason in str(excinfo.value)


def test_registered_domain_uses_the_public_suffix_list() -> None:
    assert registered_domain("www.dealer.co.uk") == "dealer.co.uk"
    assert registered_domain("shop.dealer.github.io") == "dealer.github.io"


def test_worker_main_process_parses_the_suffix_list_before_the_pool_forks() -> None:
    # The worker_init handler (the main process, before the fork) leaves the parsed list in
    # the cache that registered_domain reads, so that pool children inherit it.
    from celery.signals import worker_init

    from pipeline import celery as worker_app
    from pipeline import names

    assert any(
        receiver() is worker_app._load_before_fork for _, receiver in worker_init.receivers
    ), "not connected to worker_init"
    names._psl.cache_clear()
    worker_app._load_before_fork()
    assert names._psl.cache_info().currsize == 1
    before = names._psl.cache_info().hits
    assert registered_domain("www.example.co.uk") == "example.co.uk"
    assert names._psl.cache_info().hits == before + 1  # the list parsed before, not again
