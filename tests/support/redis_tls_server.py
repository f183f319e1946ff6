"""A redis-server of a test's own that speaks only TLS, with a throwaway CA of its own.

The server listens on 127.0.0.1 with a certificate for ``127.0.0.1`` and ``localhost`` signed by
a CA made here; with ``auth_clients`` it also demands a client certificate from that CA
(``tls-auth-clients yes``). :func:`make_ca` makes another CA, which knows nothing of the
server's: the "wrong CA" of a test.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.ports import free_port, wait_until


@dataclass(frozen=True)
class Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    file: Path  # the CA certificate, PEM


@dataclass(frozen=True)
class KeyPair:
    cert_file: Path
    key_file: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def make_ca(directory: Path, name: str) -> Ca:
    """A self-signed CA in ``directory``/``name``.pem; nothing trusts it but those given it."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name.replace(' ', '-')}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Ca(cert, key, path)


def issue(ca: Ca, directory: Path, stem: str, *, server: bool) -> KeyPair:
    """A leaf signed by ``ca``: for the server (127.0.0.1, localhost) or a client."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            False,
        )
    cert = builder.sign(ca.key, hashes.SHA256())
    pair = KeyPair(directory / f"{stem}.crt", directory / f"{stem}.key")
    pair.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, pair.key_file)
    return pair


class TlsRedisServer:
    """redis-server with TLS only (no plain port), keeping nothing on disk.

    It also listens on 127.0.0.2, a name its certificate does not carry: for host name checks.

    ``ca`` verifies it; ``client`` is a certificate it accepts (demanded with ``auth_clients``).
    """

    def __init__(self, directory: Path, *, auth_clients: bool = False) -> None:
        self.directory = directory
        self.port = free_port()
        self.auth_clients = auth_clients
        self.ca = make_ca(directory, "redis test CA")
        self.server = issue(self.ca, directory, "redis-server", server=True)
        self.client = issue(self.ca, directory, "redis-client", server=False)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def verified_client(self) -> redis.Redis[Any]:
        """A client that trusts this server's CA and presents the client certificate."""
        return redis.Redis.from_url(
            self.url,
            ssl_cert_reqs="required",
            ssl_ca_certs=str(self.ca.file),
            ssl_certfile=str(self.client.cert_file),
            ssl_keyfile=str(self.client.key_file),
            socket_timeout=5,
        )

    def start(self) -> redis.Redis[Any]:
        """Start it and return a verified client once it answers."""
        self.proc = proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--tls-port", str(self.port),
             "--bind", "127.0.0.1", "127.0.0.2",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory),
             "--tls-cert-file", str(self.server.cert_file),
             "--tls-key-file", str(self.server.key_file),
             "--tls-ca-cert-file", str(self.ca.file),
             "--tls-auth-clients", "yes" if self.auth_clients else "no"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = self.verified_client()
        # This server, not another process that took the port between free_port() and here.
        wait_until(
            lambda: client.info("server")["process_id"] == proc.pid,
            timeout=10,
            what=f"TLS redis-server on port {self.port}",
        )
        return client

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)
            self.proc = None
