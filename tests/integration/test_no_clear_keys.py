"""A private key never appears unencrypted in the database, Redis, a Celery message or a log.

The test opens every stored envelope with the edge's key (as only the edge can), then searches
everything the pipeline wrote for those keys in any encoding: PEM, base64 of DER, hex of the
private scalar. Redis traffic is captured with MONITOR for the whole run, so Celery messages,
challenges and snapshot writes are all seen, not just what is left at the end.
"""

from __future__ import annotations

import base64
import threading
from pathlib import Path

import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import create_engine, text

from pipeline.crypto import envelope
from pipeline.crypto.keys import Keyring
from tests.support.system import System

pytestmark = pytest.mark.integration


def capture(redis_url: str, sink: list[str], stop: threading.Event) -> None:
    client = redis.Redis.from_url(redis_url)
    with client.monitor() as monitor:
        for command in monitor.listen():
            sink.append(str(command.get("command", "")))
            if stop.is_set():
                break


def secret_forms(key_pem: bytes) -> list[str]:
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    body = b"".join(key_pem.splitlines()[1:-1]).decode()
    return [
        body[:40],
        base64.b64encode(der).decode()[:40],
        scalar.hex(),
        base64.b64encode(scalar).decode()[:30],
    ]


def test_no_private_key_in_clear_anywhere(redis_url: str, redis_client: redis.Redis) -> None:
    commands: list[str] = []
    stop = threading.Event()
    with System(redis_url=redis_url) as system:
        monitor = threading.Thread(target=capture, args=(redis_url, commands, stop), daemon=True)
        monitor.start()
        system.start(workers=1)
        names = ["secret-one.example.com", "secret-two.example.com"]
        for name in names:
            system.certman("domains", "add", name)
        system.wait_active(names, timeout=120)
        stop.set()
        redis_client.ping()  # one more command so that the monitor loop sees the stop flag
        monitor.join(timeout=10)

        engine = create_engine(str(system.database_url))
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT s.domain, c.chain_pem, c.key_envelope FROM certificates c "
                     "JOIN sites s ON s.id = c.site_id")
            ).all()  # fmt: skip
            dump = "\n".join(
                str(value)
                for table in (
                    "accounts",
                    "sites",
                    "site_names",
                    "orders",
                    "certificates",
                    "attempts",
                )
                for row in connection.execute(text(f"SELECT * FROM {table}"))
                for value in row
            )
        engine.dispose()
        keyring = Keyring.load_dir(system.key_dir)
        secrets: list[str] = []
        for domain, chain_pem, sealed in rows:
            from cryptography import x509

            leaf = x509.load_pem_x509_certificates(chain_pem.encode())[0]
            key_pem = envelope.open_envelope(
                envelope.from_text(sealed),
                keyring,
                domain=domain,
                binding=envelope.spki_fingerprint(leaf.public_key()),
            )
            secrets.extend(secret_forms(key_pem))
        assert len(rows) == 2 and secrets

        redis_now = "\n".join(
            str(redis_client.dump(key)) for key in redis_client.scan_iter(count=1000)
        )
        logs = "\n".join(p.read_text(errors="replace") for p in Path(system.workdir).glob("*.log"))
        places = {"database": dump, "redis traffic": "\n".join(commands), "redis now": redis_now,
                  "logs": logs}  # fmt: skip
        assert len(commands) > 50, "the Redis capture saw too little to prove anything"
        for place, content in places.items():
            assert "PRIVATE KEY" not in content, place
            for secret in secrets:
                assert secret not in content, f"a private key in clear in the {place}"
