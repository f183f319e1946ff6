"""Pebble (Let's Encrypt's test ACME server) and its challenge DNS, on free loopback ports.

pebble-challtestsrv serves DNS that resolves every name to 127.0.0.1, so Pebble's validation
authority fetches HTTP-01 challenges from ``http_port`` on this machine (the edge, in tests).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.ports import free_port, wait_listening

REPO = Path(__file__).resolve().parents[2]
# The work directories Pebble made for itself, removed with it (one a caller gave, such as the
# demo's, is the caller's to keep).
_MADE: set[Path] = set()


def _new_workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="pebble-"))
    _MADE.add(path)
    return path


def ensure_installed() -> None:
    if shutil.which("pebble") and shutil.which("pebble-challtestsrv"):
        return
    subprocess.run([str(REPO / "scripts" / "install-pebble")], check=True)


def _tls_files(directory: Path) -> Path:
    """A throw-away CA and a localhost certificate for Pebble's own listener; returns the CA."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "certman test Pebble TLS CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = directory / "key.pem"
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return directory / "ca.pem"


@dataclass
class Pebble:
    """A running Pebble; use as a context manager."""

    http_port: int
    nonce_reject_percent: int = 0
    validity_seconds: int | None = None
    blocklist: list[str] = field(default_factory=list)
    va_sleep: bool = False
    # External Account Binding required, with these key ids and base64url HMAC keys.
    eab_keys: dict[str, str] | None = None
    workdir: Path = field(default_factory=_new_workdir)

    def __post_init__(self) -> None:
        self.port = free_port()
        self.management_port = free_port()
        self.dns_port = free_port()
        self.dns_management_port = free_port()
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def directory_url(self) -> str:
        return f"https://localhost:{self.port}/dir"

    @property
    def dns_resolver(self) -> str:
        return f"127.0.0.1:{self.dns_port}"

    @property
    def pids(self) -> list[int]:
        """Pebble's and its DNS server's, while they run."""
        return [process.pid for process in self._processes]

    def start(self) -> Pebble:
        ensure_installed()
        self.ca_bundle = _tls_files(self.workdir)
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": str(self.workdir / "cert.pem"),
                "privateKey": str(self.workdir / "key.pem"),
                "httpPort": self.http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": self.eab_keys is not None,
                **({"externalAccountMACKeys": self.eab_keys} if self.eab_keys else {}),
                "domainBlocklist": self.blocklist,
                "retryAfter": {"authz": 1, "order": 1},
                **(
                    {"certificateValidityPeriod": self.validity_seconds}
                    if self.validity_seconds
                    else {}
                ),
            }
        }
        (self.workdir / "pebble.json").write_text(json.dumps(config))
        with (self.workdir / "challtestsrv.log").open("wb") as log:
            self._processes.append(
            subprocess.Popen(
                [
                    "pebble-challtestsrv",
                    "-dns01", f"127.0.0.1:{self.dns_port}",
                    "-management", f"127.0.0.1:{self.dns_management_port}",
                    "-http01", "", "-https01", "", "-tlsalpn01", "", "-doh", "",
                    "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
        env = dict(os.environ)
        env["PEBBLE_WFE_NONCEREJECT"] = str(self.nonce_reject_percent)
        env["PEBBLE_AUTHZREUSE"] = "0"
        if not self.va_sleep:
            env["PEBBLE_VA_NOSLEEP"] = "1"
        with (self.workdir / "pebble.log").open("wb") as log:
            self._processes.append(
            subprocess.Popen(
                [
                    "pebble",
                    "-config", str(self.workdir / "pebble.json"),
                    "-dnsserver", self.dns_resolver,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        )  # fmt: skip
        challtestsrv, pebble = self._processes[-2:]
        try:
            wait_listening(
                pebble, self.port, timeout=20, what="Pebble", log=self.workdir / "pebble.log"
            )
            wait_listening(
                challtestsrv,
                self.dns_management_port,
                timeout=20,
                what="challtestsrv",
                log=self.workdir / "challtestsrv.log",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def root_pem(self) -> bytes:
        """Pebble's issuing root (a new one at every start)."""
        context = ssl.create_default_context(cafile=str(self.ca_bundle))
        url = f"https://localhost:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            return bytes(response.read())

    def log_text(self) -> str:
        return (self.workdir / "pebble.log").read_text(errors="replace")

    def stop(self) -> None:
        for process in reversed(self._processes):
            process.terminate()
        for process in self._processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        self._processes.clear()

    def remove_files(self) -> None:
        """Remove the work directory, if Pebble made it; after :meth:`stop`."""
        if self.workdir in _MADE:
            shutil.rmtree(self.workdir, ignore_errors=True)
            _MADE.discard(self.workdir)

    def __enter__(self) -> Pebble:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self.remove_files()
