from __future__ import annotations

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
