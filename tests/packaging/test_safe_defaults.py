"""Flower and the exporter are not open to the network by default.

``celery -A pipeline flower`` listens on 127.0.0.1 and refuses to start without credentials
(pipeline/flower_guard.py); ``certman exporter`` listens on 127.0.0.1 unless given
``--address``. Where a server listens is read from the kernel's socket table.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ports import free_port, port_open, wait_until

BIN = Path(sys.executable).parent


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on ``port`` (IPv4 and IPv6)."""
    found: set[str] = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if int(port_hex, 16) != port or fields[3] != "0A":  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # The kernel prints each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            if width == 8:
                found.add(".".join(str(b) for b in words))
            else:
                import ipaddress

                found.add(str(ipaddress.IPv6Address(words)))
    return found


def _env(tmp_path: Path, redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWER_", "CERTMAN_"))}
    return env | {"CERTMAN_DATA_DIR": str(tmp_path), "CERTMAN_REDIS_URL": redis_url} | extra


def _status(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def test_flower_without_credentials_refuses_to_start(tmp_path: Path, redis_url: str) -> None:
    result = subprocess.run(
        [str(BIN / "celery"), "-A", "pipeline", "flower", f"--port={free_port()}"],
        env=_env(tmp_path, redis_url), cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "FLOWER_BASIC_AUTH=user:password" in lines[0], result.stderr


@pytest.mark.parametrize("how", ["environment", "conf file"])
def test_flower_with_credentials_listens_on_loopback_and_asks_for_them(
    tmp_path: Path, redis_url: str, how: str, started: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    env = _env(tmp_path, redis_url)
    if how == "environment":
        env["FLOWER_BASIC_AUTH"] = "ops:secret"
    else:
        # Flower reads flowerconfig.py from its working directory.
        (tmp_path / "flowerconfig.py").write_text("basic_auth = ['ops:secret']\n")
    with (tmp_path / "flower.log").open("wb") as log:
        flower = subprocess.Popen(
            [str(BIN / "celery"), "-A", "pipeline", "flower", f"--port={port}"],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    started.append(flower)
    wait_until(
        lambda: port_open(port) or flower.poll() is not None, timeout=60, what="Flower to listen"
    )
    assert flower.poll() is None, (tmp_path / "flower.log").read_text()
    assert listening_addresses(port) == {"127.0.0.1"}
    assert _status(f"http://127.0.0.1:{port}/") == 401
    assert _status(f"http://127.0.0.1:{port}/api/workers") == 401
    assert _status(f"http://127.0.0.1:{port}/", auth="ops:wrong") == 401
    assert _status(f"http://127.0.0.1:{port}/", auth="ops:secret") == 200


def test_exporter_listens_on_loopback_unless_told(
    tmp_path: Path, redis_url: str, started: list[subprocess.Popen[bytes]]
) -> None:
    env = _env(tmp_path, redis_url)
    subprocess.run([str(BIN / "certman"), "db", "upgrade"], env=env, check=True, timeout=60)
    default_port, any_port = free_port(), free_port()
    for args in (["--port", str(default_port)], ["--port", str(any_port), "--address", "0.0.0.0"]):
        started.append(
            subprocess.Popen(
                [str(BIN / "certman"), "exporter", *args],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
    wait_until(lambda: port_open(default_port) and port_open(any_port), timeout=30,
               what="both exporters to listen")  # fmt: skip
    assert listening_addresses(default_port) == {"127.0.0.1"}
    assert listening_addresses(any_port) == {"0.0.0.0"}  # the check can tell the two apart
    with urllib.request.urlopen(f"http://127.0.0.1:{default_port}/metrics", timeout=10) as r:
        assert "certman_store_up 1.0" in r.read().decode()
