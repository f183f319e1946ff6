"""Edge benchmark: cold start, first-handshake latency, handshakes/s, memory per context.

    .venv/bin/python -m benchmarks.edge [--sites 10000] [--duration 4] [--clients 3] [--caddy]

(as a module: run as a script, this file would shadow the ``edge`` package).

Runs its own redis-server on a free port (never the machine's), fills it with N sealed sites
(fixtures cached under /tmp/certman-edge-bench/), and runs ``certman-edge`` as a real process.
Each certificate has its own P-256 key and its own envelope (no key reuse). The baseline is the
original system's approach measured in this same run: ``legacy-rsa`` envelopes opened and every
context built eagerly before serving (timed on a sample and scaled to N, said so in the table).

``--caddy`` adds a side-by-side run against Debian's ``caddy`` (``caddy run --config``, loopback
only, its admin API off) serving the same N names from the same chains and (clear) keys: the
same multi-process client makes new-connection HTTPS requests (full TLS 1.3 handshake, no
session offered, ``GET /`` with ``Connection: close``, response read to EOF) over many names,
first against each server with one core (edge: 1 process; Caddy: GOMAXPROCS=1), then two. CPU
is utime+stime from /proc of every server process (all threads), and the client's own CPU is
reported too: on 2 cores the client, not the server, is usually what saturates.

``--h2`` (or ``--h2-only``) adds HTTP/2: ``h2load -m 10`` (Debian's ``nghttp2-client``) through
the edge and through Caddy's ``reverse_proxy`` to the same upstream, with the edge's HTTP/1.1
keep-alive rate measured on the same process for the ratio. ``--baseline DIR`` runs the edge of
another checkout (``git worktree add DIR COMMIT``) beside this one, measured in turn with it.
``--h2-streams N`` sets h2load's ``-m`` (streams in flight per connection; a browser may have up
to the 100 the edge advertises). With 2 processes each HTTP/2 row says how the edge's CPU was
split between them: h2load's few connections may all land on one process, which halves the rate
while the CPU per request hardly moves.

``--mirror`` (or ``--mirror-only``) adds the local mirror: its first fill and size, handshake
latency under load with Redis answering and then frozen (SIGSTOP) for 10 s, and an edge
restarted during the outage: how soon it serves, and how many known sites.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import multiprocessing
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis
from cryptography import x509

from edge.state import SiteIndex
from edge.tls import build_context
from edge.verifier import raw_digest
from pipeline.crypto import envelope
from pipeline.crypto.keys import Keyring, PublicKey, generate_keypair
from pipeline.crypto.signing import SigningKey, TrustedSigners
from pipeline.distribution.layout import SiteRecord, publish_site, replace_all
from tests.support.pki import Pki
from tests.support.ports import free_port, free_port_block
from tests.support.redis_server import RedisServer

CACHE = Path("/tmp/certman-edge-bench")
LIVE: list[
    subprocess.Popen[bytes]
] = []  # every server started, stopped at the end whatever happens
PREFIX = "bench"
# The pipeline's signing key for this run; the edges trust its public half (SIGNERS_DIR).
SIGNER = SigningKey.generate()
SIGNERS_DIR = Path(f"/tmp/certman-edge-bench/signers-{os.getpid()}")


def make_fixtures(n: int) -> tuple[Path, Path, Path]:
    """(records file, hpke key dir, legacy key dir); generated once per N and cached."""
    base = CACHE / str(n)
    records = base / "records.jsonl"
    hpke_dir, legacy_dir = base / "keys-hpke", base / "keys-legacy"
    if records.exists():
        return records, hpke_dir, legacy_dir
    base.mkdir(parents=True, exist_ok=True)
    hpke_pub = PublicKey.load(hpke_dir / f"{generate_keypair(hpke_dir)}.pub")
    legacy_pub = PublicKey.load(
        legacy_dir / f"{generate_keypair(legacy_dir, envelope.Scheme.LEGACY_RSA)}.pub"
    )
    pki = Pki("bench CA", days=365)
    (base / "ca.pem").write_bytes(pki.ca_pem)
    started = time.monotonic()
    tmp = records.with_suffix(".tmp")
    with tmp.open("w") as out:
        for i in range(n):
            domain = f"site{i}.bench.test"
            chain, key_pem, leaf = pki.leaf([domain], days=90)
            binding = envelope.spki_fingerprint(leaf.public_key())
            row = {
                "domain": domain,
                "chain": chain,
                "not_after": leaf.not_valid_after_utc.isoformat(),
                "serial": format(leaf.serial_number, "x"),
                "hpke": envelope.to_text(
                    envelope.seal(key_pem, hpke_pub, domain=domain, binding=binding)
                ),
                "legacy": envelope.to_text(
                    envelope.seal(key_pem, legacy_pub, domain=domain, binding=binding)
                ),
            }
            out.write(json.dumps(row) + "\n")
            if i and i % 5000 == 0:
                print(f"  generated {i}/{n} ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    tmp.rename(records)
    return records, hpke_dir, legacy_dir


def load_records(path: Path, scheme: str) -> list[SiteRecord]:
    out = []
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            out.append(
                SiteRecord(
                    domain=row["domain"],
                    names=(row["domain"],),
                    upstream=None,
                    chain_pem=row["chain"],
                    envelope=row[scheme],
                    not_after=dt.datetime.fromisoformat(row["not_after"]),
                    serial=row["serial"],
                )
            )
    return out


def client_context(ca_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=ca_pem.decode())
    return ctx


def handshake(ctx: ssl.SSLContext, port: int, name: str) -> None:
    # A fresh context session each time: Python never offers a session unless given one,
    # so every connection is a full handshake.
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=name),
    ):
        pass


class EdgeProcess:
    def __init__(
        self,
        key_dir: Path,
        redis_url: str,
        processes: int,
        cache: int,
        extra: tuple[str, ...] = (),
        source: Path | None = None,
        state_dir: Path | None = None,
    ) -> None:
        # A mirror of its own unless given one: a mirror left by another run would make a
        # "cold" start a start from the mirror.
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="certman-edge-bench-state-"))
        self.https = free_port()
        self.metrics = free_port_block(processes)
        self.processes = processes
        env = {
            **os.environ,
            "CERTMAN_REDIS_PREFIX": PREFIX,
            "CERTMAN_EDGE_TRUSTED_SIGNERS": str(SIGNERS_DIR),
            # The load comes from one address, and the upstreams listen on loopback.
            "CERTMAN_EDGE_ALLOW_LOOPBACK_UPSTREAM": "on",
            "CERTMAN_EDGE_MAX_CONNECTIONS_PER_ADDRESS": "1000000",
            "CERTMAN_EDGE_UPSTREAM_PER_CLIENT": "1000000",
            "CERTMAN_EDGE_UPSTREAM_PER_SITE": "1000000",
        }
        if source is not None:
            # Another checkout's edge (--baseline), on this venv's libraries.
            env["PYTHONPATH"] = str(source)
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from edge.cli import main; main()",
                "--http-port",
                str(free_port()),
                "--https-port",
                str(self.https),
                "--metrics-port",
                str(self.metrics),
                "--processes",
                str(processes),
                "--key-dir",
                str(key_dir),
                "--redis-url",
                redis_url,
                "--cache-size",
                str(cache),
                "--address",
                "127.0.0.1",
                "--log-level",
                "WARNING",
                "--state-dir",
                str(self.state_dir),
                *extra,
            ],  # fmt: skip
            env=env,
            cwd=source,
        )
        LIVE.append(self.proc)

    def pids(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [self.proc.pid, *map(int, children)]

    def cpu_seconds(self) -> float:
        return sum(self.cpu_by_process())

    def cpu_by_process(self) -> list[float]:
        """utime+stime of each process (the supervisor first when there are workers)."""
        out = []
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out.append((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
        return out

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def cache_misses(self) -> float:
        """Context builds so far, summed over the workers' metrics ports."""
        total = 0.0
        for port in range(self.metrics, self.metrics + self.processes):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                body = b""
                while chunk := s.recv(65536):
                    body += chunk
            for line in body.decode().splitlines():
                if line.startswith("certman_edge_context_cache_misses_total "):
                    total += float(line.split()[1])
        return total

    def warm(self, ctx: ssl.SSLContext, names: list[str]) -> None:
        """Handshake every name until no worker builds a context any more: connections are spread
        over the workers at random, and a build (~1.5 ms) in the measured runs would count as
        handshake cost."""
        for _ in range(30):
            before = self.cache_misses()
            for name in names:
                handshake(ctx, self.https, name)
            if self.cache_misses() == before:
                return
        raise RuntimeError("the edge's caches never settled")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def time_to_first_handshake(edge: EdgeProcess, ctx: ssl.SSLContext, name: str) -> float:
    while time.perf_counter() - edge.started < 60:
        try:
            handshake(ctx, edge.https, name)
            return time.perf_counter() - edge.started
        except (OSError, ssl.SSLError):
            time.sleep(0.005)
    raise RuntimeError("edge never answered")


def wait_settled(edge: EdgeProcess, n: int) -> None:
    """Until every process's first mirror fill is done and its verifier has been through every
    statement (it sets how many are pending before the fill starts): measurements are of a
    steady edge, not of one still copying n blobs to its disk or checking n signatures."""
    end = time.perf_counter() + 600
    for port in range(edge.metrics, edge.metrics + edge.processes):
        while (blobs := metric(edge, "certman_edge_mirror_blobs_fetched_total", port)) < n or (
            metric(edge, "certman_edge_signatures_pending", port) > 0
        ):
            if time.perf_counter() > end:
                raise RuntimeError(f"the edge never settled ({blobs} of {n} blobs)")
            time.sleep(0.05)


def _load_worker(args: tuple[bytes, int, list[str], float]) -> int:
    ca_pem, port, names, duration = args
    ctx = client_context(ca_pem)
    done = 0
    end = time.perf_counter() + duration
    while time.perf_counter() < end:
        handshake(ctx, port, names[done % len(names)])
        done += 1
    return done


def handshake_rate(
    edge: EdgeProcess, ca_pem: bytes, names: list[str], clients: int, duration: float
) -> tuple[float, float]:
    """(handshakes per second, server CPU ms per handshake)"""
    cpu0 = edge.cpu_seconds()
    with multiprocessing.get_context("fork").Pool(clients) as pool:
        parts = [names[i::clients] for i in range(clients)]
        counts = pool.map(_load_worker, [(ca_pem, edge.https, p, duration) for p in parts])
    total = sum(counts)
    return total / duration, (edge.cpu_seconds() - cpu0) * 1000 / total


# ---- side by side with Caddy ------------------------------------------------------------------

REQUEST = b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\nUser-Agent: bench\r\n\r\n"


def load_client_context() -> ssl.SSLContext:
    """The load loop's context: certificates were verified name by name in the warm-up pass, so
    the loop skips verification (it costs the client, not the server). No session is ever offered,
    so every connection is a full handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def https_request(ctx: ssl.SSLContext, port: int, name: str) -> int:
    """One new connection, full handshake, one request; the response's status code."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        # As curl and browsers do: without it, Nagle holds the request back behind the
        # unacknowledged client Finished until the server's delayed ACK (40 ms).
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            if tls.session_reused:
                raise RuntimeError("a session was resumed: this would not be a full handshake")
            tls.sendall(REQUEST % name.encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    return int(data[9:12])


def _request_worker(args: tuple[int, list[str], float]) -> tuple[int, int, float]:
    port, names, duration = args
    ctx = load_client_context()
    done = errors = 0
    cpu0 = time.process_time()
    end = time.perf_counter() + duration
    while time.perf_counter() < end:
        try:
            if https_request(ctx, port, names[done % len(names)]) != 404:
                errors += 1
        except (OSError, ssl.SSLError):
            errors += 1
        done += 1
    return done, errors, time.process_time() - cpu0


def proc_cpu(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def threads_cpu(pid: int) -> float:
    return proc_cpu([pid])  # a process's stat counts all its threads


def request_rate(
    port: int, server_cpu: Callable[[], float], names: list[str], clients: int, duration: float
) -> dict[str, float]:
    cpu0 = server_cpu()
    with multiprocessing.get_context("fork").Pool(clients) as pool:
        parts = [names[i::clients] for i in range(clients)]
        results = pool.map(_request_worker, [(port, p, duration) for p in parts])
    server = server_cpu() - cpu0
    total = sum(r[0] for r in results)
    return {
        "rate": total / duration,
        "errors": sum(r[1] for r in results),
        "server_ms": server * 1000 / total,
        "client_ms": sum(r[2] for r in results) * 1000 / total,
        "load": os.getloadavg()[0],
    }


def clear_keys(n: int, records: list[SiteRecord], keyring: Keyring) -> list[tuple[str, str]]:
    """(chain, clear key) per site, for Caddy; opened from the same envelopes the edge gets."""
    out = []
    for r in records:
        assert r.chain_pem and r.envelope
        leaf = x509.load_pem_x509_certificate(r.chain_pem.encode())
        key = envelope.open_envelope(
            envelope.from_text(r.envelope),
            keyring,
            domain=r.domain,
            binding=envelope.spki_fingerprint(leaf.public_key()),
        )
        out.append((r.chain_pem, key.decode()))
    return out


class CaddyProcess:
    """``caddy run`` on a loopback port with every site's certificate loaded from the config."""

    def __init__(
        self,
        n: int,
        pems: list[tuple[str, str]],
        cores: int,
        handler: dict[str, object] | None = None,
    ) -> None:
        self.https = free_port()
        handler = handler or {
            "handler": "static_response",
            "status_code": 404,
            "headers": {"Content-Type": ["text/plain; charset=utf-8"]},
            "body": "404 Not Found: no upstream for this site\n",
        }
        server: dict[str, object] = {
            "listen": [f"127.0.0.1:{self.https}"],
            "automatic_https": {"disable": True},
            "routes": [{"handle": [handler]}],
        }
        if pems:
            server["tls_connection_policies"] = [{}]
        config = {
            "admin": {"disabled": True},
            "logging": {"logs": {"default": {"level": "ERROR"}}},
            "apps": {
                "http": {"servers": {"bench": server}},
                "tls": {
                    "cache": {"capacity": n + 10},
                    "certificates": {"load_pem": [{"certificate": c, "key": k} for c, k in pems]},
                },
            },
        }
        self.config = CACHE / str(n) / f"caddy-{os.getpid()}-{self.https}.json"
        fd = os.open(self.config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        env = {**os.environ, "GOMAXPROCS": str(cores), "XDG_DATA_HOME": str(CACHE / "caddy-data"),
               "XDG_CONFIG_HOME": str(CACHE / "caddy-config")}  # fmt: skip
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            ["caddy", "run", "--config", str(self.config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        LIVE.append(self.proc)

    def cpu_seconds(self) -> float:
        return threads_cpu(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.config.unlink(missing_ok=True)


def wait_https(port: int, ctx: ssl.SSLContext, name: str, started: float) -> float:
    while time.perf_counter() - started < 120:
        try:
            handshake(ctx, port, name)
            return time.perf_counter() - started
        except (OSError, ssl.SSLError):
            time.sleep(0.01)
    raise RuntimeError("server never answered")


def side_by_side(
    hpke_dir: Path,
    url: str,
    n: int,
    hpke: list[SiteRecord],
    load_names: list[str],
    ca_pem: bytes,
    args: argparse.Namespace,
) -> list[tuple[str, str, str, str]]:
    """Edge and Caddy, same client, same names, same cores; each configuration run twice."""
    verify = client_context(ca_pem)
    pems = clear_keys(n, hpke, Keyring.load_dir(hpke_dir))
    rows: list[tuple[str, str, str, str]] = []
    for cores in (1, 2):
        results: dict[str, list[dict[str, float]]] = {"edge": [], "caddy": []}
        for server in ("edge", "caddy"):
            proc: EdgeProcess | CaddyProcess
            if server == "edge":
                proc = EdgeProcess(hpke_dir, url, cores, max(n, 10_000), tuple(args.edge_arg))
                start = wait_https(proc.https, verify, load_names[0], proc.started)
                wait_settled(proc, n)
            else:
                proc = CaddyProcess(n, pems, cores)
                start = wait_https(proc.https, verify, load_names[0], proc.started)
            try:
                # Every name with verification; the edge's contexts loaded in every process.
                if isinstance(proc, EdgeProcess):
                    proc.warm(verify, load_names)
                else:
                    for name in load_names:
                        handshake(verify, proc.https, name)
                for _ in range(args.repeat):
                    results[server].append(
                        request_rate(
                            proc.https, proc.cpu_seconds, load_names, args.clients, args.duration
                        )
                    )
            finally:
                proc.stop()
            print(f"  {server} ({cores} core(s)) ready in {start:.2f} s: {results[server]}",
                  file=sys.stderr)  # fmt: skip
        for i, (e, c) in enumerate(zip(results["edge"], results["caddy"], strict=True)):
            rows += [
                (f"new-conn HTTPS req/s, {cores} core(s), run {i + 1}",
                 f"edge {e['rate']:.0f}/s, CPU {e['server_ms']:.2f} ms",
                 f"Caddy {c['rate']:.0f}/s, CPU {c['server_ms']:.2f} ms",
                 f"ratio {e['rate'] / c['rate']:.2f} req/s, "
                 f"{e['server_ms'] / c['server_ms']:.2f} CPU/handshake"),
                ("  client CPU per request, load avg",
                 f"{e['client_ms']:.2f} ms, {e['load']:.1f}",
                 f"{c['client_ms']:.2f} ms, {c['load']:.1f}",
                 f"errors {e['errors']:.0f} / {c['errors']:.0f}"),
            ]  # fmt: skip
    return rows


def read_response(tls: ssl.SSLSocket, buf: bytes) -> tuple[int, bytes]:
    """(status, what was read past the response) for a Content-Length response."""
    while b"\r\n\r\n" not in buf:
        chunk = tls.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-response")
        buf += chunk
    head, _, buf = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buf) < length:
        chunk = tls.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        buf += chunk
    return int(head[9:12]), buf[length:]


def _keepalive_worker(args: tuple[int, list[str], float]) -> tuple[int, int, float]:
    """One request in flight on each of this worker's keep-alive connections (one per name)."""
    port, names, duration = args
    ctx = load_client_context()
    conns = []
    for name in names:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = f"GET / HTTP/1.1\r\nHost: {name}\r\nUser-Agent: bench\r\n\r\n".encode()
        conns.append((ctx.wrap_socket(raw, server_hostname=name), request))
    bufs = [b""] * len(conns)
    done = errors = 0
    cpu0 = time.process_time()
    end = time.perf_counter() + duration
    try:
        while time.perf_counter() < end:
            for tls, request in conns:
                tls.sendall(request)
            for i, (tls, _) in enumerate(conns):
                status, bufs[i] = read_response(tls, bufs[i])
                done += 1
                errors += status != 200
    finally:
        for tls, _ in conns:
            tls.close()
    return done, errors, time.process_time() - cpu0


def keepalive_rate(
    port: int, server_cpu: Callable[[], float], names: list[str], clients: int, duration: float
) -> dict[str, float]:
    cpu0 = server_cpu()
    with multiprocessing.get_context("fork").Pool(clients) as pool:
        parts = [names[i::clients] for i in range(clients)]
        results = pool.map(_keepalive_worker, [(port, p, duration) for p in parts])
    total = sum(r[0] for r in results)
    return {
        "rate": total / duration,
        "errors": sum(r[1] for r in results),
        "server_ms": (server_cpu() - cpu0) * 1000 / total,
        "client_ms": sum(r[2] for r in results) * 1000 / total,
        "load": os.getloadavg()[0],
    }


def proxy_side_by_side(
    r: redis.Redis[bytes],
    hpke_dir: Path,
    url: str,
    n: int,
    hpke: list[SiteRecord],
    ca_pem: bytes,
    args: argparse.Namespace,
) -> list[tuple[str, str, str, str]]:
    """Keep-alive requests through each proxy to the same upstream (a plain-HTTP Caddy)."""
    sites = hpke[: args.keepalive_conns]
    names = [s.domain for s in sites]
    upstream = CaddyProcess(n, [], 1, {"handler": "static_response", "body": "ok\n"})
    rows: list[tuple[str, str, str, str]] = []
    try:
        origin = f"http://127.0.0.1:{upstream.https}"
        for site in sites:
            publish_site(r, PREFIX, dataclasses.replace(site, upstream=origin), signer=SIGNER)
        pems = clear_keys(n, sites, Keyring.load_dir(hpke_dir))
        verify = client_context(ca_pem)
        for cores in (1, 2):
            res: dict[str, list[dict[str, float]]] = {"edge": [], "caddy": []}
            for server in ("edge", "caddy"):
                proc: EdgeProcess | CaddyProcess
                if server == "edge":
                    proc = EdgeProcess(hpke_dir, url, cores, max(n, 10_000), tuple(args.edge_arg))
                else:
                    proxy: dict[str, object] = {
                        "handler": "reverse_proxy",
                        "upstreams": [{"dial": origin[7:]}],
                    }
                    proc = CaddyProcess(n, pems, cores, proxy)
                wait_https(proc.https, verify, names[0], proc.started)
                if isinstance(proc, EdgeProcess):
                    wait_settled(proc, n)
                try:
                    for _ in range(args.repeat):
                        res[server].append(
                            keepalive_rate(
                                proc.https, proc.cpu_seconds, names, args.clients, args.duration
                            )
                        )
                finally:
                    proc.stop()
                print(f"  keep-alive {server} ({cores} core(s)): {res[server]}", file=sys.stderr)
            for i, (e, c) in enumerate(zip(res["edge"], res["caddy"], strict=True)):
                rows += [
                    (f"keep-alive proxied req/s, {cores} core(s), run {i + 1}",
                     f"edge {e['rate']:.0f}/s, CPU {e['server_ms']:.3f} ms",
                     f"Caddy {c['rate']:.0f}/s, CPU {c['server_ms']:.3f} ms",
                     f"ratio {e['rate'] / c['rate']:.2f} req/s, errors {e['errors']:.0f}/"
                     f"{c['errors']:.0f}, load {e['load']:.1f}/{c['load']:.1f}"),
                ]  # fmt: skip
    finally:
        upstream.stop()
    return rows


# ---- --h2: HTTP/2 multiplexed, edge and Caddy (h2load from Debian's nghttp2-client) --------


def h2load_rate(
    port: int,
    name: str,
    server_cpu: Callable[[], float],
    duration: float,
    conns: int,
    streams: int = 10,
    split: Callable[[], list[float]] | None = None,
) -> dict[str, float]:
    """``h2load -m STREAMS`` for ``duration`` s (whole seconds: h2load's -D): ``conns``
    connections, ``streams`` in flight on each, one client thread; the server's CPU per request
    from /proc. With ``split`` (CPU seconds by process), ``busiest``: the largest share of the
    server's CPU that one process took."""
    cpu0 = server_cpu()
    parts0 = split() if split is not None else []
    out = subprocess.run(
        ["h2load", "-D", f"{max(1, round(duration))}", "-c", str(conns), "-m", str(streams),
         "-t", "1",
         "--connect-to", f"127.0.0.1:{port}", f"https://{name}:{port}/"],
        capture_output=True, text=True, timeout=duration + 60, check=False,
    ).stdout  # fmt: skip
    cpu = server_cpu() - cpu0
    busiest = 1.0
    if split is not None:
        deltas = [b - a for a, b in zip(parts0, split(), strict=True)]
        busiest = max(deltas) / max(sum(deltas), 1e-9)
    done = re.search(
        r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out
    )
    protocol = re.search(r"Application protocol: (\S+)", out)
    if done is None or protocol is None or protocol.group(1) != "h2":
        raise RuntimeError(f"h2load did not run over h2:\n{out}")
    ok = int(done.group(1))
    return {
        "rate": ok / max(1, round(duration)),
        "errors": float(done.group(2)),
        "server_ms": cpu * 1000 / max(ok, 1),
        "load": os.getloadavg()[0],
        "busiest": busiest,
    }


def h2_side_by_side(
    r: redis.Redis[bytes],
    hpke_dir: Path,
    url: str,
    n: int,
    hpke: list[SiteRecord],
    ca_pem: bytes,
    args: argparse.Namespace,
) -> list[tuple[str, str, str, str]]:
    """HTTP/2 through each proxy to the same upstream (a plain-HTTP Caddy), and, on the same
    edge process, its HTTP/1.1 keep-alive rate as the keep-alive rows measure it: the target
    is HTTP/2 at >= 0.8x the edge's own HTTP/1.1."""
    sites = hpke[: args.keepalive_conns]
    names = [s.domain for s in sites]
    upstream = CaddyProcess(n, [], 1, {"handler": "static_response", "body": "ok\n"})
    rows: list[tuple[str, str, str, str]] = []
    # As many requests in flight as the keep-alive rows have connections (24: 2 x 10 streams),
    # so that the upstream pool is loaded alike.
    conns = max(1, round(args.keepalive_conns / 10))
    try:
        origin = f"http://127.0.0.1:{upstream.https}"
        for site in sites:
            publish_site(r, PREFIX, dataclasses.replace(site, upstream=origin), signer=SIGNER)
        pems = clear_keys(n, sites, Keyring.load_dir(hpke_dir))
        verify = client_context(ca_pem)
        # With --baseline, the older edge and this one run side by side and are measured in
        # turn, run after run: the machine's load falls on both alike.
        servers = ("base", "edge", "caddy") if args.baseline else ("edge", "caddy")
        for cores in (1, 2):
            h1: dict[str, list[dict[str, float]]] = {"edge": [], "base": []}
            res: dict[str, list[dict[str, float]]] = {"edge": [], "base": [], "caddy": []}
            procs: dict[str, EdgeProcess | CaddyProcess] = {}
            try:
                for server in servers:
                    proc: EdgeProcess | CaddyProcess
                    if server != "caddy":
                        source = args.baseline if server == "base" else None
                        proc = EdgeProcess(
                            hpke_dir, url, cores, max(n, 10_000), tuple(args.edge_arg), source
                        )
                    else:
                        proxy: dict[str, object] = {
                            "handler": "reverse_proxy",
                            "upstreams": [{"dial": origin[7:]}],
                        }
                        proc = CaddyProcess(n, pems, cores, proxy)
                    procs[server] = proc
                    wait_https(proc.https, verify, names[0], proc.started)
                    if isinstance(proc, EdgeProcess):
                        wait_settled(proc, n)
                for _ in range(args.repeat):
                    for server, proc in procs.items():
                        split = proc.cpu_by_process if isinstance(proc, EdgeProcess) else None
                        res[server].append(
                            h2load_rate(
                                proc.https,
                                names[0],
                                proc.cpu_seconds,
                                args.duration,
                                conns,
                                args.h2_streams,
                                split if cores > 1 else None,
                            )
                        )
                        if server != "caddy":
                            h1[server].append(
                                keepalive_rate(
                                    proc.https, proc.cpu_seconds, names, args.clients, args.duration
                                )
                            )
            finally:
                for proc in procs.values():
                    proc.stop()
            for server in servers:
                print(f"  h2 {server} ({cores} core(s)): {res[server]}", file=sys.stderr)
            for label in servers[:-1]:
                who = "baseline" if label == "base" else "edge"
                for i, (e, c, k) in enumerate(
                    zip(res[label], res["caddy"], h1[label], strict=True)
                ):
                    spread = f", busiest process {e['busiest']:.0%}" if cores > 1 else ""
                    rows += [
                        (f"HTTP/2 h2load -m {args.h2_streams} req/s, {cores} core(s), run {i + 1}",
                         f"{who} {e['rate']:.0f}/s, CPU {e['server_ms']:.3f} ms",
                         f"Caddy {c['rate']:.0f}/s, CPU {c['server_ms']:.3f} ms",
                         f"ratio {e['rate'] / c['rate']:.2f}; {who} HTTP/1.1 keep-alive "
                         f"{k['rate']:.0f}/s, CPU {k['server_ms']:.3f} ms: h2 "
                         f"{e['rate'] / k['rate']:.2f}x; errors {e['errors']:.0f}/"
                         f"{c['errors']:.0f}, load {e['load']:.1f}/{c['load']:.1f}{spread}"),
                    ]  # fmt: skip
    finally:
        upstream.stop()
    return rows


def eager_per_cert(records: list[SiteRecord], keyring: Keyring, sample: int) -> float:
    """Seconds per site to open the envelope and build the context, as an eager start does."""
    chosen = records[:sample]
    started = time.perf_counter()
    for r in chosen:
        assert r.chain_pem and r.envelope
        chain = r.chain_pem.encode()
        leaf = x509.load_pem_x509_certificate(chain)
        key = envelope.open_envelope(
            envelope.from_text(r.envelope),
            keyring,
            domain=r.domain,
            binding=envelope.spki_fingerprint(leaf.public_key()),
        )
        build_context(chain, key)
    return (time.perf_counter() - started) / len(chosen)


def verification_cost(
    trusted: TrustedSigners, raw_index: dict[bytes, bytes], raw_signed: dict[bytes, bytes]
) -> tuple[float, float]:
    """(seconds per first use of a site whose statement is verified on use, the same when its
    signature was verified ahead): SiteIndex.get of 2,000 sites each, as a first handshake
    calls it, the rest of the handshake left out."""
    domains = [d.decode() for d in list(raw_index)[:2000]]

    def first_uses(index: SiteIndex) -> float:
        t = time.perf_counter()
        for domain in domains:
            index.get(domain)
        return (time.perf_counter() - t) / len(domains)

    on_use = SiteIndex(trusted)
    on_use.load_snapshot(raw_index, raw_signed)
    ahead = SiteIndex(trusted)
    ahead.load_snapshot(raw_index, raw_signed)
    ahead.trust((d, raw_digest(raw_signed[d.encode()])) for d in domains)
    return first_uses(on_use), first_uses(ahead)


def metric(edge: EdgeProcess, name: str, port: int | None = None) -> float:
    """A metric of one of the edge's workers (the first by default; 0 if absent)."""
    with socket.create_connection(("127.0.0.1", port or edge.metrics), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        body = b""
        while chunk := s.recv(65536):
            body += chunk
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _timed_handshakes(ctx: ssl.SSLContext, port: int, names: list[str]) -> list[float]:
    times = []
    for name in names:
        t = time.perf_counter()
        handshake(ctx, port, name)
        times.append(time.perf_counter() - t)
    return times


def under_load(
    edge: EdgeProcess,
    ca_pem: bytes,
    ctx: ssl.SSLContext,
    cached: list[str],
    uncached: list[str],
    clients: int,
    seconds: float,
) -> tuple[list[float], list[float]]:
    """Handshake latencies (cached names, first handshakes of uncached ones) measured while
    ``clients`` processes keep the edge busy with handshakes of cached names."""
    with multiprocessing.get_context("fork").Pool(clients) as pool:
        parts = [cached[i::clients] for i in range(clients)]
        load = pool.map_async(_load_worker, [(ca_pem, edge.https, p, seconds) for p in parts])
        warm: list[float] = []
        first: list[float] = []
        end = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < end and i < len(uncached):
            warm += _timed_handshakes(ctx, edge.https, [cached[i % len(cached)]])
            first += _timed_handshakes(ctx, edge.https, [uncached[i]])
            i += 1
        load.get()
    return warm, first


def mirror_rows(
    server: RedisServer,
    hpke_dir: Path,
    url: str,
    n: int,
    names: list[str],
    ctx: ssl.SSLContext,
    ca_pem: bytes,
    clients: int,
) -> list[tuple[str, str, str, str]]:
    """The local mirror: first fill, bytes per site; handshakes under load with Redis up and
    then frozen for 10 s; an edge restarted during the outage, from its mirror alone."""
    rng = random.Random(2)
    state = Path(tempfile.mkdtemp(prefix="certman-edge-bench-mirror-"))
    edge = EdgeProcess(hpke_dir, url, 1, max(n, 10_000), state_dir=state)
    cold = time_to_first_handshake(edge, ctx, rng.choice(names))
    while metric(edge, "certman_edge_mirror_blobs_fetched_total") < n:
        time.sleep(0.05)
    filled = time.perf_counter() - edge.started
    wait_settled(edge, n)
    settled = time.perf_counter() - edge.started
    size = metric(edge, "certman_edge_mirror_bytes")
    sample = rng.sample(names, min(n, 1200))
    cached, fresh_up, fresh_frozen = sample[:200], sample[200:700], sample[700:1200]
    edge.warm(ctx, cached)
    up = under_load(edge, ca_pem, ctx, cached, fresh_up, clients, 10.0)
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        frozen = under_load(edge, ca_pem, ctx, cached, fresh_frozen, clients, 10.0)
        edge.stop()
        # Restarted during the outage: ready from the mirror, every known site served.
        again = EdgeProcess(hpke_dir, url, 1, max(n, 10_000), state_dir=state)
        frozen_start = time_to_first_handshake(again, ctx, rng.choice(names))
        known = names if n <= 10_000 else rng.sample(names, 10_000)
        served = 0
        for name in known:
            try:
                handshake(ctx, again.https, name)
                served += 1
            except (OSError, ssl.SSLError):
                pass
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    # A whole snapshot re-read (a resync) while handshakes go on.
    while metric(again, "certman_edge_sync_connected") != 1.0:
        time.sleep(0.05)
    again.warm(ctx, cached)
    snapshots = 'certman_edge_sync_snapshots_total{cause="gap"}'
    before = metric(again, snapshots)
    redis.Redis.from_url(url).publish(f"{PREFIX}:events", '{"type":"resync","version":0}')
    during: list[float] = []
    deadline = time.perf_counter() + 120
    while metric(again, snapshots) == before and time.perf_counter() < deadline:
        during += _timed_handshakes(ctx, again.https, cached[:20])
    again.stop()

    def p(values: list[float]) -> str:
        return f"{pct(values, 50) * 1000:.2f} / {pct(values, 99) * 1000:.2f} ms"

    return [
        ("mirror: start -> first handshake, no mirror", f"{cold * 1000:.0f} ms",
         f"mirror filled after {filled:.1f} s, signatures verified after {settled:.1f} s", ""),
        ("mirror: bytes per site", f"{size / n:.0f} B", f"{size / 2**20:.1f} MiB for {n}", ""),
        (f"under load ({clients} clients), Redis up: cached p50/p99", p(up[0]), "", ""),
        ("  first handshake, uncached p50/p99", p(up[1]), f"{len(up[1])} names", ""),
        ("Redis frozen 10 s under load: cached p50/p99", p(frozen[0]), "",
         f"p99 {pct(frozen[0], 99) / pct(up[0], 99):.2f}x Redis up"),
        ("  first handshake, uncached p50/p99", p(frozen[1]), f"{len(frozen[1])} names",
         f"p99 {pct(frozen[1], 99) / pct(up[1], 99):.2f}x Redis up"),
        ("restarted with Redis frozen: start -> handshake", f"{frozen_start * 1000:.0f} ms",
         "from the mirror alone", f"{frozen_start / cold:.2f}x the start without mirror"),
        ("  known sites served", f"{served}/{len(known)}",
         "every site" if len(known) == n else "a sample", f"{100 * served / len(known):.1f} %"),
        ("snapshot re-read: cached p50/p99 meanwhile", p(during),
         f"max {max(during) * 1000:.1f} ms over {len(during)}",
         f"p99 {pct(during, 99) / pct(up[0], 99):.2f}x under load"),
    ]  # fmt: skip


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--eager-sample", type=int, default=500)
    parser.add_argument("--caddy", action="store_true", help="also measure Caddy side by side")
    parser.add_argument("--caddy-only", action="store_true", help="only the side-by-side runs")
    parser.add_argument("--keepalive", action="store_true", help="keep-alive proxy vs Caddy")
    parser.add_argument("--keepalive-only", action="store_true")
    parser.add_argument("--h2", action="store_true", help="HTTP/2 (h2load -m 10) vs Caddy")
    parser.add_argument("--h2-only", action="store_true")
    parser.add_argument(
        "--h2-streams", type=int, default=10, help="with --h2: h2load's -m (streams per connection)"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="with --h2: also run the edge of this source tree (an older checkout), interleaved",
    )
    parser.add_argument(
        "--mirror", action="store_true", help="the local mirror: fill, size, Redis frozen"
    )
    parser.add_argument("--mirror-only", action="store_true")
    parser.add_argument("--keepalive-conns", type=int, default=24)
    parser.add_argument("--names", type=int, default=1000, help="names in side-by-side load")
    parser.add_argument("--repeat", type=int, default=2, help="runs per side-by-side config")
    parser.add_argument(
        "--edge-arg", action="append", default=[], help="extra certman-edge argument"
    )
    args = parser.parse_args()
    if not SIGNERS_DIR.exists():
        SIGNER.write(SIGNERS_DIR)
    n = args.sites
    records_file, hpke_dir, legacy_dir = make_fixtures(n)
    ca_pem = (CACHE / str(n) / "ca.pem").read_bytes()
    ctx = client_context(ca_pem)
    server = RedisServer()
    url = server.url
    rows: list[tuple[str, str, str, str]] = []
    try:
        r = server.start()
        hpke = load_records(records_file, "hpke")
        t = time.perf_counter()
        replace_all(r, PREFIX, hpke, signer=SIGNER)
        print(f"snapshot of {n} sites written in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        names = [rec.domain for rec in hpke]
        rng = random.Random(1)
        # What an edge does before it can handshake: read version + index, build the name map.
        t = time.perf_counter()
        with r.pipeline(transaction=True) as pipe:
            pipe.get(f"{PREFIX}:version")
            pipe.hgetall(f"{PREFIX}:index")
            pipe.hgetall(f"{PREFIX}:signed")
            _, raw_index, raw_signed = pipe.execute()
        trusted = TrustedSigners.of([SIGNER.public_key()])
        SiteIndex(trusted).load_snapshot(raw_index, raw_signed)
        snapshot_read = time.perf_counter() - t
        on_use, ahead = verification_cost(trusted, raw_index, raw_signed)

        if not (args.caddy_only or args.keepalive_only or args.mirror_only or args.h2_only):
            # 1. cold start and first handshakes of not-yet-loaded names
            edge = EdgeProcess(hpke_dir, url, 1, max(n, 10_000))
            start = time_to_first_handshake(edge, ctx, rng.choice(names))
            wait_settled(edge, n)
            rss_before = edge.rss_kib()
            cold = rng.sample(names, 300)
            first: list[float] = []
            for name in cold:
                t = time.perf_counter()
                handshake(ctx, edge.https, name)
                first.append(time.perf_counter() - t)
            warm: list[float] = []
            for name in cold[:200]:
                t = time.perf_counter()
                handshake(ctx, edge.https, name)
                warm.append(time.perf_counter() - t)
            # memory: load 3,000 more contexts
            loaded = rng.sample([x for x in names if x not in set(cold)], min(3000, n - 300))
            for name in loaded:
                handshake(ctx, edge.https, name)
            rss_per = (edge.rss_kib() - rss_before) / (len(loaded))
            load_names = cold + loaded
            rate1, cpu1 = handshake_rate(edge, ca_pem, load_names, args.clients, args.duration)
            edge.stop()

            edge2 = EdgeProcess(hpke_dir, url, 2, max(n, 10_000))
            time_to_first_handshake(edge2, ctx, names[0])
            wait_settled(edge2, n)
            edge2.warm(ctx, load_names)  # every name's context in both processes
            rate2, cpu2 = handshake_rate(edge2, ca_pem, load_names, args.clients, args.duration)
            edge2.stop()

            # baseline: legacy-rsa, every envelope opened and context built before serving
            legacy = load_records(records_file, "legacy")
            per_legacy = eager_per_cert(legacy, Keyring.load_dir(legacy_dir), args.eager_sample)
            per_hpke = eager_per_cert(hpke, Keyring.load_dir(hpke_dir), args.eager_sample)
            legacy_start = per_legacy * n

            p50, p99 = pct(first, 50) * 1000, pct(first, 99) * 1000
            rows += [
                ("start -> first handshake", f"{start * 1000:.0f} ms",
                 f"{legacy_start:.1f} s (eager legacy-rsa, {args.eager_sample}-site sample x {n})",
                 f"{legacy_start / start:.0f}x faster"),
                ("  of which: index snapshot read", f"{snapshot_read * 1000:.0f} ms", "", ""),
                ("  signed statement, verified ahead", f"{ahead * 1000:.3f} ms",
                 "what a first handshake adds: the statement parsed, its signature checked on "
                 "the verifier's thread before", ""),
                ("  signed statement, verified on use", f"{on_use * 1000:.3f} ms",
                 "only when a handshake comes before the verifier got there",
                 f"{on_use / ahead:.1f}x verified ahead"),
                ("first handshake, unloaded name p50", f"{p50:.2f} ms",
                 f"{per_legacy * 1000:.2f} ms open+build per legacy site",
                 f"hpke open+build {per_hpke * 1000:.2f} ms"),
                ("first handshake, unloaded name p99", f"{p99:.2f} ms", "", ""),
                ("handshake, cached context p50", f"{pct(warm, 50) * 1000:.2f} ms", "", ""),
                ("full handshakes/s, 1 process", f"{rate1:.0f}/s",
                 f"server CPU {cpu1:.2f} ms each", ""),
                ("full handshakes/s, 2 processes", f"{rate2:.0f}/s",
                 f"server CPU {cpu2:.2f} ms each", f"{rate2 / rate1:.2f}x 1 process"),
                ("RSS per loaded context", f"{rss_per:.1f} KiB",
                 f"over {len(loaded)} contexts", ""),
            ]  # fmt: skip
        if args.caddy or args.caddy_only:
            load_names = rng.sample(names, min(n, args.names))
            rows += side_by_side(hpke_dir, url, n, hpke, load_names, ca_pem, args)
        if args.keepalive or args.keepalive_only:
            rows += proxy_side_by_side(r, hpke_dir, url, n, hpke, ca_pem, args)
        if args.h2 or args.h2_only:
            rows += h2_side_by_side(r, hpke_dir, url, n, hpke, ca_pem, args)
        if args.mirror or args.mirror_only:
            rows += mirror_rows(server, hpke_dir, url, n, names, ctx, ca_pem, args.clients)
    finally:
        for proc in LIVE:  # servers left running by a failed measurement
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        server.stop()
        load = os.getloadavg()[0]
        print(f"\nedge benchmark, {n} sealed sites, {os.cpu_count()} CPUs, "
              f"{args.clients} client procs, load average {load:.1f} at the end")  # fmt: skip
        widths = [max((len(row[i]) for row in rows), default=0) for i in range(4)]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
