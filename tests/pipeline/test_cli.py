"""The ``certman`` command as operators' scripts use it (ARCHITECTURE.md section 4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CERTMAN = str(Path(sys.executable).parent / "certman")


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
    assert other_names.returncode != 0 and "remove it first" in other_names.stderr
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
