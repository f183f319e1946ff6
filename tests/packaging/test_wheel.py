"""The wheel is the product: installed outside the checkout, it runs every role and issues.

Only the installed commands run certman here (``certman``, ``certman-onboard``,
``certman-edge``, ``celery -A pipeline worker|beat|flower``, ``certman exporter``), from a
working directory outside the checkout (``celery -A`` puts the working directory on the import
path), against a real Pebble and Redis: the harness of the integration tests, pointed at the
test virtualenv's ``bin``.
"""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cryptography import x509

from tests.packaging.conftest import Installed
from tests.support import system as system_module
from tests.support.ports import free_port, port_open, wait_until
from tests.support.system import System

# The session's wheel is built (up to 600 s) and installed (up to 900 s) in the first test.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]


class InstalledSystem(System):
    """The integration harness, with the edge key and the signing key made by the installed
    ``certman``, and Redis ACL users as in production."""

    def _generate(self, *args: str) -> str:
        generated = subprocess.run(
            [str(system_module.BIN / "certman"), "keys", "generate", *args],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        return generated.stdout.strip()

    def start(self, *, workers: int = 1, edge: bool = True) -> InstalledSystem:
        self.pebble.start()
        key_id = self._generate("--dir", str(self.key_dir))
        self.edge_public_key = self.key_dir / f"{key_id}.pub"
        signing_id = self._generate("--purpose", "signing", "--dir", str(self.signing_dir))
        self.signing_key_path = self.signing_dir / f"{signing_id}.key"
        self.trust(self.signing_key_path)
        if self.acl:
            self.apply_acl()
        self.certman("db", "upgrade")
        if edge:
            self.start_edge()
        for _ in range(workers):
            # One pool child: a single certificate, and fewer processes starting on 2 cores.
            self.start_worker(concurrency=1)
        return self


@pytest.fixture
def outside(
    installed: Installed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """The harness runs the installed commands, from a directory that is not the checkout."""
    monkeypatch.setattr(system_module, "BIN", installed.bin)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.delenv("CERTMAN_CELERY_CONFIG", raising=False)
    yield tmp_path


def test_the_wheel_carries_the_migrations_and_the_commands(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    assert "migrations/versions/0001_initial_schema.py" in names
    assert "migrations/script.py.mako" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = zipfile.ZipFile(installed.wheel).read(entry_points).decode()
    for command in ("certman", "certman-edge", "certman-onboard"):
        assert f"{command} = " in scripts
    where = subprocess.run(
        [str(installed.bin / "python"), "-c", "import pipeline, edge; print(pipeline.__file__)"],
        capture_output=True, text=True, check=True, cwd="/", timeout=60,
    )  # fmt: skip
    assert where.stdout.startswith(str(installed.venv))


def fetch_certificate(port: int, name: str, root_pem: bytes) -> x509.Certificate:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=root_pem.decode())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def http_status(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_installed_wheel_runs_every_role_and_issues(
    installed: Installed, outside: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    # The operator's override file: beat's dispatcher every second, so that the site onboarded
    # without a kick is started by beat (and the test need not wait its usual 15 s).
    config = outside / "celery.conf.py"
    config.write_text(
        "from datetime import timedelta\n"
        "from pipeline.celeryconfig import *\n"
        "beat_schedule['dispatch']['schedule'] = timedelta(seconds=1)\n"
    )
    system = InstalledSystem(
        redis_url=redis_url,
        workdir=outside / "system",
        extra_env={"CERTMAN_CELERY_CONFIG": str(config)},
    )
    system.workdir.mkdir()
    with system:
        system.start(workers=1)
        system.start_beat()
        flower_port, exporter_port = free_port(), free_port()
        with (system.workdir / "flower.log").open("ab") as log:
            system.workers.append(
                subprocess.Popen(
                    [str(installed.bin / "celery"), "-A", "pipeline", "flower",
                     f"--port={flower_port}"],
                    env=system.env | {"FLOWER_BASIC_AUTH": "ops:secret"},
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            )  # fmt: skip
        with (system.workdir / "exporter.log").open("ab") as log:
            system.workers.append(
                subprocess.Popen(
                    [str(installed.bin / "certman"), "exporter", "--port", str(exporter_port)],
                    env=system.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            )  # fmt: skip

        dealers = outside / "dealers.csv"
        dealers.write_text(
            "domain,upstream,aliases\nwheel-dealer.example.com,,www.wheel-dealer.example.com\n"
        )
        onboard = subprocess.run(
            [str(installed.bin / "certman-onboard"), "--no-queue", str(dealers)],
            env=system.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert onboard.returncode == 0, onboard.stderr
        assert "1 added" in onboard.stdout

        try:
            system.wait_active(["wheel-dealer.example.com"], timeout=90)
            root = system.pebble.root_pem()
            for name in ("wheel-dealer.example.com", "www.wheel-dealer.example.com"):
                wait_until(
                    lambda n=name: fetch_certificate(system.https_port, n, root),
                    timeout=30,
                    what=f"the edge to serve {name}",
                )
            wait_until(lambda: port_open(flower_port), timeout=30, what="Flower to listen")
            wait_until(lambda: port_open(exporter_port), timeout=30, what="the exporter")
        except (TimeoutError, AssertionError):
            print(system.logs())
            raise

        assert http_status(f"http://127.0.0.1:{flower_port}/api/workers") == 401
        assert http_status(f"http://127.0.0.1:{flower_port}/", auth="ops:secret") == 200
        metrics_url = f"http://127.0.0.1:{exporter_port}/metrics"
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            metrics = response.read().decode()
        assert 'certman_sites{state="active"} 1.0' in metrics
        # Beat is what started the order (onboarded with --no-queue), from the override file.
        assert "Sending due task dispatch" in (system.workdir / "beat.log").read_text()
