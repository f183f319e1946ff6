"""The Redis ACL rules operators copy from docs/production.md are the ones the integration tests
apply (tests/integration/test_redis_acl.py runs a whole issuance under them)."""

from __future__ import annotations

from pathlib import Path

from pipeline.distribution.acl import edge_rules, pipeline_rules, setuser_commands

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_documented_rules_are_the_ones_tested() -> None:
    text = (DOCS / "production.md").read_text()
    for command in setuser_commands():
        assert " ".join(command) in text, f"docs/production.md lacks: {' '.join(command)}"


def test_the_edge_may_write_nothing() -> None:
    rules = edge_rules("certman")
    assert "-@all" in rules and "%R~certman:*" in rules
    writes = {"+set", "+hset", "+del", "+publish", "+eval", "+evalsha", "+@write", "+@all"}
    assert not writes & set(rules)


def test_the_prefix_and_database_are_followed() -> None:
    rules = pipeline_rules("acme", db=3)
    assert "~acme:*" in rules and "&acme:events" in rules
    assert "&/3.celeryev/*" in rules and "&/3.celery.pidbox" in rules
    assert not any(rule.startswith("~certman") for rule in rules)
