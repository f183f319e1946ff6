"""The ``certman`` command as operators' scripts use it (the contracts in docs/architecture.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

BIN = Path(sys.executable).parent
CERTMAN = str(BIN / "certman")


def certman(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [CERTMAN, *args], env=os.environ | env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def env(certman_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    # No workers here: issuance is queued to this test's Redis database and stays there.
    return certman_env | {"CERTMAN_PIPELINE_KEY": str(tmp_path / "pipeline.key")}


def test_domains_add_list_remove(env: dict[str, str], redis_client: object) -> None:
    added = certman(
        env, "domains", "add", "Dealer.example.com",
        "--alias", "www.dealer.example.com", "--upstream", "http://127.0.0.1:9/",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "issuance queued" in added.stdout
    listed = certman(env, "domains", "list", "--json")
    rows = json.loads(listed.stdout)
    assert [(r["domain"], r["state"], r["not_after"], r["last_error"]) for r in rows] == [
        ("dealer.example.com", "pending", None, None)
    ]
    assert rows[0]["aliases"] == ["www.dealer.example.com"]
    again = certman(
        env, "domains", "add", "dealer.example.com", "--alias", "www.dealer.example.com"
    )
    assert again.returncode == 0 and again.stdout.strip().endswith("already there")
    other_names = certman(env, "domains", "add", "dealer.example.com")
    assert other_names.returncode != 0 and "certman domains update" in other_names.stderr
    removed = certman(env, "domains", "remove", "www.dealer.example.com")
    assert removed.returncode == 0 and "removed dealer.example.com" in removed.stdout
    assert json.loads(certman(env, "domains", "list", "--json").stdout) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("domains", "add", "co.uk"), "public suffix itself"),
        (("domains", "add", "1.2.3.4"), "IP address"),
        (("domains", "remove", "nobody.example.com"), "not a known site"),
        (("domains", "add", "ok.example.com", "--upstream", "gopher://x"), "upstream"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(
    env: dict[str, str], args: tuple[str, ...], message: str
) -> None:
    result = certman(env, *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_bad_setting_names_the_variable(env: dict[str, str]) -> None:
    result = certman(env | {"CERTMAN_HTTP01_PORT": "x"}, "status", "--json")
    assert result.returncode != 0
    assert "CERTMAN_HTTP01_PORT" in result.stderr and "Traceback" not in result.stderr


def test_database_down_is_one_line(env: dict[str, str]) -> None:
    down = env | {"CERTMAN_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/nope"}
    result = certman(down, "domains", "list", "--json")
    assert result.returncode != 0
    assert result.stderr.startswith("certman: database unavailable")
    assert len(result.stderr.strip().splitlines()) == 1


def test_status_json(env: dict[str, str], redis_client: object) -> None:
    certman(env, "domains", "add", "dealer.example.com")
    report = json.loads(certman(env, "status", "--json").stdout)
    assert report["sites"] == {"pending": 1}
    assert report["orders_in_flight"] == 0
    assert report["orders_stuck"] == 0
    assert isinstance(report["rate_limits"], list)


def test_keys_generate_writes_a_private_key_only_its_owner_reads(
    tmp_path: Path, env: dict[str, str]
) -> None:
    result = certman(env, "keys", "generate", "--dir", str(tmp_path / "keys"))
    key_id = result.stdout.strip()
    assert result.returncode == 0 and len(key_id) == 16
    assert (tmp_path / "keys" / f"{key_id}.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys" / f"{key_id}.pub").exists()


# --- --version and -h ----------------------------------------------------------------------------
def _commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            found += _commands(command, (*path, name))
        else:
            found.append((*path, name))
    return found


COMMANDS = _commands(__import__("pipeline.cli.commands", fromlist=["main"]).main)


def test_every_command_is_found() -> None:
    assert {("domains", "add"), ("db", "upgrade"), ("exporter",), ("orders", "stuck")} <= set(
        COMMANDS
    )


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "certman")
def test_every_command_answers_help(path: tuple[str, ...]) -> None:
    from pipeline.cli.commands import main

    for flag in ("-h", "--help"):
        result = CliRunner().invoke(main, [*path, flag], prog_name="certman")
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"Usage: {' '.join(('certman', *path))} ")


@pytest.mark.parametrize(
    "argv",
    [
        ["certman", "--version"],
        ["certman", "-h"],
        ["certman", "domains", "add", "-h"],
        ["certman-onboard", "--version"],
        ["certman-onboard", "-h"],
        ["certman-edge", "--version"],
        ["certman-edge", "-h"],
    ],
    ids=" ".join,
)
def test_installed_commands_answer_version_and_help(argv: list[str]) -> None:
    from importlib.metadata import version

    result = subprocess.run(
        [str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    if argv[-1] == "--version":
        assert version("certman") in result.stdout
    else:
        assert "usage:" in result.stdout.lower()


# --- database URLs -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "mysql://certman:secret@db.example/certman",
            "certman: CERTMAN_DATABASE_URL: the driver for mysql:// is not installed "
            "(pip install mysqlclient)",
        ),
        (
            "postgresql+psycopg2://certman:secret@db.example/certman",
            "certman: CERTMAN_DATABASE_URL: the driver for postgresql+psycopg2:// is not "
            "installed (pip install psycopg2-binary)",
        ),
        (
            "nosuchdb://x/y",
            "certman: CERTMAN_DATABASE_URL: unknown database nosuchdb:// "
            "(use sqlite:///PATH or postgresql://USER@HOST/DB)",
        ),
    ],
)
def test_a_url_without_its_driver_is_one_line(tmp_path: Path, url: str, expected: str) -> None:
    env = {"CERTMAN_DATA_DIR": str(tmp_path), "CERTMAN_DATABASE_URL": url}
    result = certman(env, "domains", "list", "--json")
    assert result.returncode == 1
    assert result.stderr.strip() == expected
    assert "secret" not in result.stderr


def test_postgresql_urls_as_postgres_tools_print_them(
    pg_database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """``postgresql://`` and ``postgres://`` use psycopg 3 (SQLAlchemy alone picks psycopg2)."""
    env = {"CERTMAN_DATA_DIR": str(tmp_path), "CERTMAN_REDIS_URL": redis_url}
    assert pg_database_url.startswith("postgresql+psycopg://")
    rest = pg_database_url.removeprefix("postgresql+psycopg://")
    for scheme in ("postgresql", "postgres"):
        url = f"{scheme}://{rest}"
        upgraded = certman(env | {"CERTMAN_DATABASE_URL": url}, "db", "upgrade")
        assert upgraded.returncode == 0, upgraded.stderr
        listed = certman(env | {"CERTMAN_DATABASE_URL": url}, "status", "--json")
        assert listed.returncode == 0, listed.stderr
        assert "sites" in json.loads(listed.stdout)


def test_exporter_help_shows_the_loopback_default() -> None:
    from pipeline.cli.commands import main

    result = CliRunner().invoke(main, ["exporter", "--help"], prog_name="certman")
    assert "--address" in result.output and "127.0.0.1" in result.output


def test_keys_generate_a_signing_key(tmp_path: Path, env: dict[str, str]) -> None:
    from pipeline.crypto.signing import SigningKey, TrustedSigners

    directory = tmp_path / "signing"
    result = certman(env, "keys", "generate", "--purpose", "signing", "--dir", str(directory))
    assert result.returncode == 0, result.stderr
    key_id = result.stdout.strip()
    assert (directory / f"{key_id}.key").stat().st_mode & 0o777 == 0o600
    assert SigningKey.load(directory / f"{key_id}.key").key_id == key_id
    assert TrustedSigners.load(directory / f"{key_id}.pub").key_ids == {key_id}
    both = certman(
        env, "keys", "generate", "--purpose", "signing", "--scheme", "hpke-xwing",
        "--dir", str(directory),
    )  # fmt: skip
    assert both.returncode != 0 and "--scheme applies to envelope keys only" in both.stderr


def test_keys_status_counts_records_per_signing_key(
    env: dict[str, str], redis_client: object, tmp_path: Path
) -> None:
    certman(env, "domains", "add", "a.example.com")
    certman(env, "domains", "add", "b.example.com")
    certman(env, "domains", "remove", "b.example.com")
    rows = json.loads(certman(env, "keys", "status", "--json").stdout)
    signing = [row for row in rows if row["purpose"] == "signing"]
    key_id = (tmp_path / "signing.pub").exists() and signing[0]["key_id"]
    assert signing == [
        {"purpose": "signing", "scheme": "ed25519", "key_id": key_id, "certificates": 0,
         "records": 1, "tombstones": 1, "in_use": True},
        {"purpose": "signing", "scheme": "ed25519", "key_id": None, "certificates": 0,
         "records": 0, "tombstones": 0, "in_use": False, "unsigned": True},
    ]  # fmt: skip
    text = certman(env, "keys", "status").stdout
    assert f"signing key in use: {key_id}" in text
    assert f"signed by {key_id} (in use): 1 records, 1 tombstones" in text
    assert "unsigned" not in text


def test_an_unreadable_signing_key_is_one_line(env: dict[str, str], tmp_path: Path) -> None:
    key = tmp_path / "open.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    key.chmod(0o644)
    result = certman(env | {"CERTMAN_SIGNING_KEY": str(key)}, "domains", "add", "a.example.com")
    assert result.returncode != 0
    assert str(key) in result.stderr and "chmod 600" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
