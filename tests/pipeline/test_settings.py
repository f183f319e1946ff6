from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path

import pytest

from pipeline.settings import Settings, SettingsError, load_settings


def test_defaults_are_the_embedded_system(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CERTMAN_DATABASE_URL", "CERTMAN_REDIS_URL", "CERTMAN_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    settings = Settings()
    assert settings.effective_database_url == "sqlite:///.certman/certman.db"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.self_check is True
    assert settings.http01_port == 80


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("CERTMAN_HTTP01_PORT", "eighty", "CERTMAN_HTTP01_PORT"),
        ("CERTMAN_HTTP01_PORT", "70000", "CERTMAN_HTTP01_PORT"),
        ("CERTMAN_REDIS_URL", "localhost:6379", "CERTMAN_REDIS_URL: Value error, must start"),
        ("CERTMAN_DATABASE_URL", "certman.db", "CERTMAN_DATABASE_URL"),
        ("CERTMAN_DNS_RESOLVER", "127.0.0.1", "CERTMAN_DNS_RESOLVER"),
        ("CERTMAN_SELF_CHECK", "perhaps", "CERTMAN_SELF_CHECK"),
        ("CERTMAN_KEY_TYPE", "dsa", "CERTMAN_KEY_TYPE"),
    ],
)
def test_a_bad_variable_is_named(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, message: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=message):
        load_settings()


def test_self_check_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTMAN_SELF_CHECK", "off")
    assert load_settings().self_check is False


# --- outbound requests and Redis over TLS --------------------------------------------------------
@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in paths.values():
        path.write_text("-----BEGIN CERTIFICATE-----\n")
    return paths


def test_upstream_settings_default_to_private_ranges_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("CERTMAN_UPSTREAM_ALLOW_LINK_LOCAL", "CERTMAN_UPSTREAM_ALLOWED_NETWORKS"):
        monkeypatch.delenv(var, raising=False)
    settings = load_settings()
    assert settings.upstream_allow_link_local is False
    assert settings.upstream_allowed_networks == ()


def test_allowed_networks_take_commas_or_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTMAN_UPSTREAM_ALLOWED_NETWORKS", "10.0.0.0/8,192.168.0.0/16 fd00::/8")
    monkeypatch.setenv("CERTMAN_UPSTREAM_ALLOW_LINK_LOCAL", "on")
    settings = load_settings()
    assert settings.upstream_allowed_networks == (
        ip_network("10.0.0.0/8"),
        ip_network("192.168.0.0/16"),
        ip_network("fd00::/8"),
    )
    assert settings.upstream_allow_link_local is True


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("CERTMAN_UPSTREAM_ALLOWED_NETWORKS", "10.0.0.1/8",
         r"CERTMAN_UPSTREAM_ALLOWED_NETWORKS: .*'10\.0\.0\.1/8' has host bits set"),
        ("CERTMAN_UPSTREAM_ALLOWED_NETWORKS", "10.0.0.0/8 intranet",
         "CERTMAN_UPSTREAM_ALLOWED_NETWORKS: .*'intranet' is not a network"),
        ("CERTMAN_UPSTREAM_ALLOW_LINK_LOCAL", "maybe", "CERTMAN_UPSTREAM_ALLOW_LINK_LOCAL"),
        ("CERTMAN_REDIS_CA_FILE", "/nonexistent/ca.pem",
         "CERTMAN_REDIS_CA_FILE: .*/nonexistent/ca.pem is not a file"),
        ("CERTMAN_REDIS_URL", "rediss://redis.internal:6380/0?ssl_cert_reqs=none",
         "CERTMAN_REDIS_URL: .*must not carry TLS options \\(ssl_cert_reqs\\)"),
    ],
)  # fmt: skip
def test_bad_outbound_and_redis_tls_variables_are_named(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, message: str
) -> None:
    monkeypatch.setenv("CERTMAN_REDIS_URL", "rediss://redis.internal:6380/0")
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=message):
        load_settings()


def test_redis_tls_files_are_read(monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]) -> None:
    monkeypatch.setenv("CERTMAN_REDIS_URL", "rediss://redis.internal:6380/0")
    monkeypatch.setenv("CERTMAN_REDIS_CA_FILE", str(files["ca"]))
    monkeypatch.setenv("CERTMAN_REDIS_CERT_FILE", str(files["cert"]))
    monkeypatch.setenv("CERTMAN_REDIS_KEY_FILE", str(files["key"]))
    settings = load_settings()
    assert (settings.redis_ca_file, settings.redis_cert_file, settings.redis_key_file) == (
        files["ca"],
        files["cert"],
        files["key"],
    )


def test_an_empty_redis_tls_variable_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTMAN_REDIS_CA_FILE", "")
    assert load_settings().redis_ca_file is None


@pytest.mark.parametrize("only", ["CERTMAN_REDIS_CERT_FILE", "CERTMAN_REDIS_KEY_FILE"])
def test_a_client_certificate_needs_its_key_and_the_key_its_certificate(
    monkeypatch: pytest.MonkeyPatch, files: dict[str, Path], only: str
) -> None:
    monkeypatch.setenv("CERTMAN_REDIS_URL", "rediss://redis.internal:6380/0")
    monkeypatch.setenv(only, str(files["cert"]))
    with pytest.raises(
        SettingsError, match="^CERTMAN_REDIS_CERT_FILE and CERTMAN_REDIS_KEY_FILE go together"
    ):
        load_settings()


def test_redis_tls_files_without_a_rediss_url_are_refused(
    monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    monkeypatch.setenv("CERTMAN_REDIS_URL", "redis://redis.internal:6379/0")
    monkeypatch.setenv("CERTMAN_REDIS_CA_FILE", str(files["ca"]))
    with pytest.raises(
        SettingsError, match="CERTMAN_REDIS_CA_FILE set, but CERTMAN_REDIS_URL is not a rediss://"
    ):
        load_settings()


# --- signed distribution -------------------------------------------------------------------------
def test_signing_key_defaults_to_the_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CERTMAN_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CERTMAN_SIGNING_KEY", raising=False)
    assert load_settings().effective_signing_key == tmp_path / "signing.key"
    monkeypatch.setenv("CERTMAN_SIGNING_KEY", str(tmp_path / "k" / "abc.key"))
    assert load_settings().effective_signing_key == tmp_path / "k" / "abc.key"


@pytest.mark.parametrize(
    ("var", "message"),
    [
        ("CERTMAN_SIGNING_KEY", "CERTMAN_SIGNING_KEY: Value error, .* is a directory"),
        ("CERTMAN_EDGE_TRUSTED_SIGNERS", "CERTMAN_EDGE_TRUSTED_SIGNERS: Value error, .* does not"),
    ],
)
def test_bad_signing_paths_are_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, var: str, message: str
) -> None:
    monkeypatch.setenv(var, str(tmp_path if var == "CERTMAN_SIGNING_KEY" else tmp_path / "no"))
    with pytest.raises(SettingsError, match=message):
        load_settings()


def test_trusted_signers_may_be_a_file_or_a_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "a.pub").write_text("")
    for path in (tmp_path, tmp_path / "a.pub"):
        monkeypatch.setenv("CERTMAN_EDGE_TRUSTED_SIGNERS", str(path))
        assert load_settings().edge_trusted_signers == path


# --- Redis Sentinel and beat's lock --------------------------------------------------------------
SENTINELS = "sentinel://:secret@10.0.0.1:26379/2;sentinel://10.0.0.2:26379;sentinel://10.0.0.3"


def test_sentinel_over_tls_is_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTMAN_REDIS_URL", SENTINELS)
    monkeypatch.setenv("CERTMAN_REDIS_SENTINEL_MASTER", "certman")
    monkeypatch.setenv("CERTMAN_REDIS_SENTINEL_TLS", "true")
    monkeypatch.setenv("CERTMAN_REDIS_CA_FILE", __file__)
    settings = load_settings()
    assert settings.redis_sentinel_tls is True
    assert str(settings.redis_ca_file) == __file__


def test_sentinel_settings_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTMAN_REDIS_URL", SENTINELS)
    monkeypatch.setenv("CERTMAN_REDIS_SENTINEL_MASTER", "certman")
    monkeypatch.setenv("CERTMAN_REDIS_SENTINEL_PASSWORD", "sentinels-own")
    monkeypatch.setenv("CERTMAN_BEAT_LOCK_TIMEOUT", "12")
    settings = load_settings()
    assert settings.redis_sentinel_master == "certman"
    assert settings.redis_sentinel_password == "sentinels-own"
    assert settings.beat_lock_timeout == 12


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CERTMAN_REDIS_URL": SENTINELS}, "^CERTMAN_REDIS_SENTINEL_MASTER must be set"),
        (
            {"CERTMAN_REDIS_SENTINEL_MASTER": "certman"},
            "^CERTMAN_REDIS_SENTINEL_MASTER set, but CERTMAN_REDIS_URL is not a sentinel://",
        ),
        (
            {"CERTMAN_REDIS_SENTINEL_PASSWORD": "x"},
            "^CERTMAN_REDIS_SENTINEL_PASSWORD set, but CERTMAN_REDIS_URL is not a sentinel://",
        ),
        (
            # kombu would read database 0 from the first address; redis-py's clients, 3.
            {"CERTMAN_REDIS_URL": "sentinel://a:26379;sentinel://b:26379/3",
             "CERTMAN_REDIS_SENTINEL_MASTER": "certman"},
            "^CERTMAN_REDIS_URL: the database number and Redis's user and password go on the first",
        ),
        (
            {"CERTMAN_REDIS_URL": "sentinel://a:26379;redis://b:6379",
             "CERTMAN_REDIS_SENTINEL_MASTER": "certman"},
            r"^CERTMAN_REDIS_URL: each ';'-separated address must be a sentinel:// URL \(#2",
        ),
        ({"CERTMAN_BEAT_LOCK_TIMEOUT": "1"}, "^CERTMAN_BEAT_LOCK_TIMEOUT"),
        (
            {"CERTMAN_REDIS_SENTINEL_TLS": "true"},
            "^CERTMAN_REDIS_SENTINEL_TLS is on, but CERTMAN_REDIS_URL is not a sentinel://",
        ),
        (
            # TLS files with Sentinels, but TLS not turned on: Redis would be used in clear.
            {"CERTMAN_REDIS_URL": SENTINELS, "CERTMAN_REDIS_SENTINEL_MASTER": "certman",
             "CERTMAN_REDIS_CA_FILE": __file__},
            r"^CERTMAN_REDIS_CA_FILE set, but .* \(nor a sentinel:// one with "
            "CERTMAN_REDIS_SENTINEL_TLS on\\)",
        ),
    ],
)  # fmt: skip
def test_bad_sentinel_settings_are_named(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for var in ("CERTMAN_REDIS_URL", "CERTMAN_REDIS_SENTINEL_MASTER"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=message) as caught:
        load_settings()
    assert "secret" not in str(caught.value)
