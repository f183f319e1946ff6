"""Redis over TLS, verified by every client: against a real TLS-only redis-server.

For the limiter and the snapshot publisher (pipeline.locks), an asyncio client as the
edge makes them, and the Celery broker (kombu): the right CA works; a wrong CA, or none (the
test CA is not in the system's store), fails closed: the call raises and nothing is written.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from kombu import Connection

from pipeline import runtime
from pipeline.distribution import layout as distribution
from pipeline.redis_tls import RedisTls
from pipeline.settings import get_settings
from tests.support.redis_tls_server import Ca, TlsRedisServer, make_ca

REPO = Path(__file__).resolve().parents[2]
PREFIX = "certman"


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[TlsRedisServer]:
    directory = Path(tempfile.mkdtemp(prefix="certman-test-redis-tls-"))
    server = TlsRedisServer(directory)
    try:
        server.start().close()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def mtls_redis() -> Iterator[TlsRedisServer]:
    """One that demands a client certificate (tls-auth-clients yes)."""
    directory = Path(tempfile.mkdtemp(prefix="certman-test-redis-mtls-"))
    server = TlsRedisServer(directory, auth_clients=True)
    try:
        server.start().close()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def wrong_ca(tmp_path_factory: pytest.TempPathFactory) -> Ca:
    """A CA that signed nothing the servers present."""
    return make_ca(tmp_path_factory.mktemp("wrong-ca"), "some other CA")


@pytest.fixture
def server_data(tls_redis: TlsRedisServer) -> Iterator[redis.Redis[Any]]:
    """A verified client of the TLS server, its database emptied around the test."""
    client = tls_redis.verified_client()
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """Point the process's settings at a Redis URL with the given TLS files, afresh."""

    def apply(url: str, ca: Path | None, cert: Path | None = None, key: Path | None = None) -> None:
        monkeypatch.setenv("CERTMAN_DATA_DIR", str(tmp_path))
        monkeypatch.setenv("CERTMAN_REDIS_URL", url)
        for var, value in (("CA", ca), ("CERT", cert), ("KEY", key)):
            if value is None:
                monkeypatch.delenv(f"CERTMAN_REDIS_{var}_FILE", raising=False)
            else:
                monkeypatch.setenv(f"CERTMAN_REDIS_{var}_FILE", str(value))
        get_settings.cache_clear()
        runtime.reset(close=True)  # a runtime (and signing key) of this test's settings

    yield apply
    get_settings.cache_clear()
    runtime.reset(close=True)


def _record(domain: str = "dealer.example.com") -> distribution.SiteRecord:
    return distribution.SiteRecord(
        domain=domain,
        names=(domain,),
        upstream="http://10.0.0.5:8080",
        chain_pem=None,
        envelope=None,
        not_after=None,
        serial=None,
    )


# --- the options ---------------------------------------------------------------------------------
def test_plain_and_unix_urls_get_no_tls_options(tmp_path: Path) -> None:
    tls = RedisTls(ca_file=tmp_path / "ca.pem")
    for url in ("redis://127.0.0.1:6379/0", "unix:///run/redis.sock"):
        assert tls.redis_kwargs(url) == {}
        assert tls.celery_ssl(url) is None


def test_rediss_urls_always_verify(tmp_path: Path) -> None:
    url = "rediss://redis.internal:6380/0"
    assert RedisTls().redis_kwargs(url) == {
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_ca_certs": None,  # the system's store
        "ssl_certfile": None,
        "ssl_keyfile": None,
    }
    tls = RedisTls(tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "k.pem")
    assert tls.celery_ssl(url) == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_check_hostname": True,
        "ssl_ca_certs": str(tmp_path / "ca.pem"),
        "ssl_certfile": str(tmp_path / "c.pem"),
        "ssl_keyfile": str(tmp_path / "k.pem"),
    }


def test_tls_options_in_the_url_are_refused() -> None:
    """redis-py and kombu let the URL's options override the ones passed beside it."""
    url = "rediss://redis.internal:6380/0?ssl_cert_reqs=none"
    with pytest.raises(ValueError, match=r"TLS options \(ssl_cert_reqs\)"):
        RedisTls().redis_kwargs(url)
    with pytest.raises(ValueError, match="TLS options"):
        RedisTls().celery_ssl(url)


def test_a_certificate_needs_its_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both its certificate and key"):
        RedisTls(cert_file=tmp_path / "c.pem")


# --- the runtime's Redis: the limiter and the snapshot publisher ------------------------------
def test_the_right_ca_works_for_the_limiter_and_the_snapshot(
    configure: Any, tls_redis: TlsRedisServer, server_data: redis.Redis[Any]
) -> None:
    configure(tls_redis.url, tls_redis.ca.file)
    assert runtime.current().redis.ping()
    decision = runtime.current().limiter.pace("new-order")
    assert decision.allowed
    runtime.current().publisher.publish(_record())
    assert runtime.current().publisher.exists()
    assert server_data.exists(f"{PREFIX}:version")
    assert any(server_data.scan_iter(f"{PREFIX}:*ratelimit*")) or server_data.dbsize() > 1


@pytest.mark.parametrize("which", ["wrong CA", "no CA file (system store)"])
def test_an_unverified_server_fails_closed(
    configure: Any,
    tls_redis: TlsRedisServer,
    server_data: redis.Redis[Any],
    wrong_ca: Ca,
    which: str,
) -> None:
    configure(tls_redis.url, wrong_ca.file if which == "wrong CA" else None)
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        runtime.current().redis.set("written", "1")
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        runtime.current().limiter.pace("new-order")
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        runtime.current().publisher.publish(_record())
    assert server_data.dbsize() == 0


def test_the_host_name_is_checked(
    configure: Any, tls_redis: TlsRedisServer, server_data: redis.Redis[Any]
) -> None:
    """The certificate names 127.0.0.1 and localhost; another name for the same server fails."""
    url = tls_redis.url.replace("127.0.0.1", "127.0.0.2")  # still this machine, not in the cert
    kwargs = RedisTls(ca_file=tls_redis.ca.file).redis_kwargs(url)
    client = redis.Redis.from_url(url, socket_connect_timeout=5, **kwargs)
    try:
        with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED|match"):
            client.set("written", "1")
    finally:
        client.close()
    assert server_data.dbsize() == 0


def test_a_client_certificate_is_presented_when_configured(
    configure: Any, mtls_redis: TlsRedisServer
) -> None:
    configure(mtls_redis.url, mtls_redis.ca.file)
    with pytest.raises(redis.ConnectionError):
        runtime.current().redis.set("written", "1")
    configure(
        mtls_redis.url, mtls_redis.ca.file, mtls_redis.client.cert_file, mtls_redis.client.key_file
    )
    assert runtime.current().redis.set("written", "1")
    check = mtls_redis.verified_client()
    try:
        assert check.get("written") == b"1"
        check.flushdb()
    finally:
        check.close()


# --- the edge's asyncio clients ------------------------------------------------------------------
def test_asyncio_clients_verify_the_same_way(
    tls_redis: TlsRedisServer, server_data: redis.Redis[Any], wrong_ca: Ca
) -> None:
    async def use(ca: Path) -> bytes | None:
        kwargs = RedisTls(ca_file=ca).redis_kwargs(tls_redis.url)
        client = redis.asyncio.Redis.from_url(tls_redis.url, socket_connect_timeout=5, **kwargs)
        try:
            await client.set("edge", "1")
            value: bytes | None = await client.get("edge")
            return value
        finally:
            await client.aclose()

    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(use(wrong_ca.file))
    assert server_data.dbsize() == 0
    assert asyncio.run(use(tls_redis.ca.file)) == b"1"


# --- the Celery broker (kombu) -------------------------------------------------------------------
def _kombu_round_trip(url: str, ssl_options: dict[str, Any] | None) -> Any:
    with Connection(url, ssl=ssl_options, connect_timeout=5) as connection:
        connection.ensure_connection(max_retries=1)
        queue = connection.SimpleQueue("certman-tls-test")
        try:
            queue.put({"hello": "broker"})
            return queue.get(timeout=5).payload
        finally:
            queue.close()


def test_the_broker_with_celery_ssl_and_the_right_ca_works(
    tls_redis: TlsRedisServer, server_data: redis.Redis[Any]
) -> None:
    options = RedisTls(ca_file=tls_redis.ca.file).celery_ssl(tls_redis.url)
    assert _kombu_round_trip(tls_redis.url, options) == {"hello": "broker"}


@pytest.mark.parametrize("which", ["wrong CA", "no CA file (system store)"])
def test_the_broker_with_celery_ssl_fails_closed(
    tls_redis: TlsRedisServer, server_data: redis.Redis[Any], wrong_ca: Ca, which: str
) -> None:
    options = RedisTls(ca_file=wrong_ca.file if which == "wrong CA" else None).celery_ssl(
        tls_redis.url
    )
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        _kombu_round_trip(tls_redis.url, options)
    assert server_data.dbsize() == 0


def test_kombu_left_to_itself_does_not_verify(
    tls_redis: TlsRedisServer, server_data: redis.Redis[Any]
) -> None:
    """Why broker_use_ssl must be set: with a rediss:// URL and no options kombu talks to a
    server nobody vouched for (ssl_cert_reqs=CERT_NONE)."""
    assert _kombu_round_trip(tls_redis.url, None) == {"hello": "broker"}


def test_the_broker_presents_the_client_certificate(mtls_redis: TlsRedisServer) -> None:
    options = RedisTls(
        mtls_redis.ca.file, mtls_redis.client.cert_file, mtls_redis.client.key_file
    ).celery_ssl(mtls_redis.url)
    assert _kombu_round_trip(mtls_redis.url, options) == {"hello": "broker"}


# --- the Celery app as configured (CERTMAN_* read afresh in a new interpreter) -------------------
_APP_PROBE = """
import json, ssl, sys
from pipeline.celery import app
conf = app.conf.broker_use_ssl
out = {"broker_use_ssl": None if not conf else {
    k: (int(v) if isinstance(v, ssl.VerifyMode) else v) for k, v in dict(conf).items()}}
try:
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        connection.default_channel.client.set("celery-app-probe", "1")
    out["connected"] = True
except Exception as exc:
    out["connected"] = False
    out["error"] = repr(exc)
print(json.dumps(out))
"""


def _probe_app(url: str, ca: Path, data_dir: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTMAN_")}
    env.update(CERTMAN_DATA_DIR=str(data_dir), CERTMAN_REDIS_URL=url, CERTMAN_REDIS_CA_FILE=str(ca))
    done = subprocess.run(
        [sys.executable, "-c", _APP_PROBE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_the_celery_app_verifies_the_broker(
    tls_redis: TlsRedisServer, server_data: redis.Redis[Any], wrong_ca: Ca, tmp_path: Path
) -> None:
    """Needs ``broker_use_ssl = RedisTls.from_settings(s).celery_ssl(s.redis_url)`` in the
    Celery configuration."""
    right = _probe_app(tls_redis.url, tls_redis.ca.file, tmp_path)
    assert right["broker_use_ssl"] is not None, "broker_use_ssl is not set: kombu won't verify"
    assert right["broker_use_ssl"]["ssl_cert_reqs"] == int(ssl.CERT_REQUIRED)
    assert right["broker_use_ssl"]["ssl_ca_certs"] == str(tls_redis.ca.file)
    assert right["connected"], right
    server_data.flushdb()
    wrong = _probe_app(tls_redis.url, wrong_ca.file, tmp_path)
    assert not wrong["connected"] and "CERTIFICATE_VERIFY_FAILED" in wrong["error"]
    assert server_data.dbsize() == 0


# What a worker answers to `celery inspect conf`, which Flower asks on every refresh: Celery masks
# the broker URL by making a kombu Connection of it, without broker_use_ssl.
_CONF_PROBE = """
import json, logging
from types import SimpleNamespace
warnings = []
class Keep(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger().addHandler(Keep())
logging.getLogger().setLevel(logging.WARNING)
from celery.worker import control
from pipeline.celery import app
answer = control.conf(SimpleNamespace(app=app), with_defaults=False)
print(json.dumps({"warnings": warnings, "broker_url": answer["broker_url"]}))
"""


def test_the_masked_broker_url_logs_no_insecure_ssl_warning(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "some CA").file
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTMAN_")}
    env.update(
        CERTMAN_DATA_DIR=str(tmp_path),
        CERTMAN_REDIS_URL="rediss://:s3cret@redis.internal:6380/0",
        CERTMAN_REDIS_CA_FILE=str(ca),
    )
    done = subprocess.run(
        [sys.executable, "-c", _CONF_PROBE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not [w for w in result["warnings"] if "insecure" in w.lower()], result["warnings"]
    assert result["broker_url"] == "rediss://:********@redis.internal:6380/0"
