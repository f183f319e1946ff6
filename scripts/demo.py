"""The demo: the whole system on this machine, dozens of dealer sites issued and served.

``scripts/demo`` makes the venv, installs Pebble, then runs this. It starts, on loopback:
Pebble (Let's Encrypt's test CA) with a DNS server that points every name at this machine, the
edge, a Celery worker, beat and Flower, all through ``tests.support.system.System`` (the same
harness the integration tests use, so the demo runs the real commands), on the embedded
defaults: SQLite under ``.demo/`` and the local Redis in a database of its own (8 by default,
cleared at start, which it says first) under the key prefix ``certman-demo``; a database
holding keys no demo marked as its own (``certman-demo:owner``: a shared Redis's) is refused
unless ``--force``. A tiny
upstream server plays every dealer's website. ``scripts/sample-dealers.csv`` goes in through
the real ``scripts/bulk_onboard.py``; when every valid site is active, the demo shows each
certificate as fetched over TLS with SNI from the edge, and each dealer's page fetched through
the edge over HTTPS. Then it stays up until Ctrl-C (or ``--stop`` from another shell).

    scripts/demo              start, show, stay up
    scripts/demo --no-wait    start, show, stop (a smoke test for CI: non-zero if anything failed)
    scripts/demo --stop       stop a demo started earlier (pid file in .demo/)
    scripts/demo --redis-db 9 another Redis database (cleared at start)
"""

from __future__ import annotations

import argparse
import html
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEMO = REPO / ".demo"
PIDFILE = DEMO / "demo.pid"
SAMPLE = REPO / "scripts" / "sample-dealers.csv"
PREFIX = "certman-demo"


def say(text: str = "") -> None:
    print(text, flush=True)


# --- the dealers' websites ---------------------------------------------------------------------
def dealer_name(host: str) -> str:
    label = host.split(":")[0].removeprefix("www.").split(".")[0]
    return " ".join(word.capitalize() for word in label.split("-"))


class DealerSite(BaseHTTPRequestHandler):
    """Every dealer's website: a page naming the dealer of the Host the edge forwards."""

    def do_GET(self) -> None:
        host = self.headers.get("X-Forwarded-Host") or self.headers.get("Host") or "unknown"
        name = html.escape(dealer_name(host))
        body = (
            f"<!doctype html><title>{name} - fictional dealer</title>\n"
            f"<h1>{name}</h1><p>Served for {html.escape(host)} by the demo upstream, "
            f"through the certman edge ({html.escape(self.headers.get('X-Forwarded-Proto', '?'))})."
            "</p>\n"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the edge logs requests already


@contextmanager
def dealer_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), DealerSite)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="dealer-sites", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --- looking at the edge -----------------------------------------------------------------------
def client_context(root_pem: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=root_pem.decode())
    return context


def fetch_certificate(port: int, name: str, context: ssl.SSLContext) -> dict[str, str]:
    """A TLS handshake with SNI ``name``, verified against Pebble's root."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    issuer = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return {
        "issuer": str(issuer[0].value) if issuer else cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}"[:16],
        "expires": cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M"),
    }


class _EdgeConnection(http.client.HTTPSConnection):
    """HTTPS to ``host`` at the edge on loopback: no DNS lookup, SNI and Host are the name."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext) -> None:
        super().__init__(host, port, context=context, timeout=5)
        self._context = context

    def connect(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)


def fetch_page(port: int, name: str, context: ssl.SSLContext) -> str:
    connection = _EdgeConnection(name, port, context)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        body = response.read().decode(errors="replace")
    finally:
        connection.close()
    match = re.search(r"<title>(.*?)</title>", body, re.S)
    first = match.group(1) if match else (body.splitlines() or [""])[0]
    return f"{response.status} {html.unescape(first).strip()}"[:48]


# --- the store ---------------------------------------------------------------------------------
def sites(database_url: str) -> list[dict[str, Any]]:
    from pipeline.db import session_scope
    from pipeline.fleet.sites import list_sites

    with session_scope(database_url) as session:
        return list_sites(session)


def wait_active(database_url: str, timeout: float) -> list[dict[str, Any]]:
    """Poll the store until every site is active, or the deadline; report progress meanwhile."""
    deadline = time.monotonic() + timeout
    last_report = ""
    while True:
        rows = sites(database_url)
        states: dict[str, int] = {}
        for row in rows:
            states[row["state"]] = states.get(row["state"], 0) + 1
        report = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        if report != last_report:
            say(f"  {report}")
            last_report = report
        if rows and all(row["state"] == "active" for row in rows):
            return rows
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every site active after {timeout:.0f} s: {report}")
        time.sleep(0.5)


# --- pid file and --stop -----------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def write_pidfile(system: Any) -> None:
    children = [p.pid for p in system.workers]
    children += [p.pid for p in system.pebble._processes]
    if system.edge is not None:
        children.append(system.edge.pid)
    PIDFILE.write_text(json.dumps({"pid": os.getpid(), "children": children}))


def stop_earlier() -> int:
    if not PIDFILE.exists():
        say("no demo running (no .demo/demo.pid)")
        return 0
    state = json.loads(PIDFILE.read_text())
    pid = int(state["pid"])
    if _alive(pid) and "demo.py" in _cmdline(pid):
        os.kill(pid, signal.SIGTERM)  # the demo stops what it started
        deadline = time.monotonic() + 60
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    # The demo was killed without cleaning up: end its children ourselves, checking that each
    # pid is still one of ours (pids are reused).
    for child in state.get("children", []):
        if _alive(child) and re.search(r"celery|certman-edge|pebble", _cmdline(child)):
            with suppress(ProcessLookupError):
                # Workers lead a process group of their own (their pool children are in it).
                if os.getpgid(child) == child:
                    os.killpg(child, signal.SIGTERM)
                else:
                    os.kill(child, signal.SIGTERM)
    PIDFILE.unlink(missing_ok=True)
    say(f"demo stopped (pid {pid})")
    return 0


# --- the Redis database it clears ---------------------------------------------------------------
# Written when the demo takes a database: another app's keys may look like the demo's (Celery's
# own keys are the same for every Celery app), so only this marker says the database is a demo's.
OWNER_KEY = f"{PREFIX}:owner"


def claim_database(client: Any, db: int, *, force: bool) -> str | None:
    """Clear the demo's database and mark it as the demo's; None, or why not (it holds keys and
    no demo marked it)."""
    size = client.dbsize()
    if size and not client.exists(OWNER_KEY) and not force:
        shown = ", ".join(
            repr(raw.decode(errors="replace")) for raw in client.scan(count=100)[1][:3]
        )
        return (
            f"Redis database {db} holds {size} keys that no demo marked as its own ({shown}): "
            f"not clearing it; choose an empty one with --redis-db N, or --force"
        )
    client.flushdb()
    client.set(OWNER_KEY, "scripts/demo")
    return None


# --- the run -----------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.splitlines()[0])
    parser.add_argument("--stop", action="store_true", help="stop a demo started earlier")
    parser.add_argument("--no-wait", action="store_true", help="exit after showing the table")
    parser.add_argument(
        "--redis-db", type=int, default=8, help="Redis database (cleared at start; default 8)"
    )
    parser.add_argument(
        "--redis", default="redis://127.0.0.1:6379", help="the Redis server (without a database)"
    )
    parser.add_argument(
        "--force", action="store_true", help="clear the database even if it holds others' keys"
    )
    parser.add_argument("--csv", type=Path, default=SAMPLE, help="the dealers to onboard")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for issuance")
    parser.add_argument("--concurrency", type=int, default=8, help="the worker's processes")
    return parser.parse_args()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    if args.stop:
        return stop_earlier()
    import redis

    redis_url = f"{args.redis.rstrip('/')}/{args.redis_db}"
    say(f"demo: uses Redis database {args.redis_db} at {args.redis} and clears it at start")
    DEMO.mkdir(exist_ok=True)
    if PIDFILE.exists():
        pid = int(json.loads(PIDFILE.read_text())["pid"])
        if _alive(pid) and "demo.py" in _cmdline(pid):
            say(f"demo: already running (pid {pid}); stop it with scripts/demo --stop")
            return 1
        stop_earlier()  # a stale pid file: clean what that run left behind
    # Refused before anything is started or cleared: a shared Redis's keys stay.
    try:
        client = redis.Redis.from_url(redis_url)
        refused = claim_database(client, args.redis_db, force=args.force)
        client.close()
    except redis.exceptions.RedisError as exc:
        say(f"demo: Redis unavailable at {redis_url}: {exc}")
        return 1
    if refused:
        say(f"demo: {refused}")
        return 1

    from tests.support.ports import free_port
    from tests.support.system import System

    for directory in ("run", "pebble"):
        shutil.rmtree(DEMO / directory, ignore_errors=True)
        (DEMO / directory).mkdir()

    signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.monotonic()
    ok = False
    system = System(
        redis_url=redis_url,
        workdir=DEMO / "run",
        pebble_options={"workdir": DEMO / "pebble"},
        redis_prefix=PREFIX,
        supervise=True,
        # The machine's shared Redis is not the demo's to administer: no ACL users of its own
        # there (a demo killed with SIGKILL would leave them behind). The pipeline still signs
        # what it publishes and the edge trusts only its public key (tests/support/system.py).
        acl=False,
    )
    try:
        with dealer_server() as upstream:
            say("starting Pebble, the edge, a worker, beat and Flower ...")
            system.start(workers=0)
            system.start_worker(concurrency=args.concurrency)
            system.start_beat()
            flower_port = free_port()
            system.start_flower(flower_port)
            write_pidfile(system)
            say(f"  up in {time.monotonic() - started:.1f} s; dealer websites at {upstream}")

            shown = args.csv.relative_to(REPO) if args.csv.is_relative_to(REPO) else args.csv
            say(f"onboarding {shown} ...")
            rejected = DEMO / "sample-dealers.rejected.csv"
            result = subprocess.run(
                [sys.executable, str(REPO / "scripts" / "bulk_onboard.py"), str(args.csv),
                 "--upstream-default", upstream, "--rejected", str(rejected)],
                env=system.env, capture_output=True, text=True, cwd=DEMO,
            )  # fmt: skip
            for line in result.stdout.splitlines():
                say(f"  {line}")
            if result.returncode != 0:
                say(f"demo: bulk_onboard failed: {result.stderr.strip()}")
                return 1
            if rejected.exists():
                for row in rejected.read_text().splitlines()[1:]:
                    say(f"    rejected: {row}")

            say("issuing (Pebble validates HTTP-01 through the edge) ...")
            try:
                rows = wait_active(str(system.database_url), args.timeout)
            except TimeoutError as exc:
                say(f"demo: {exc}")
                say(system.logs())
                rows = sites(str(system.database_url))
            else:
                say(f"  every site active {time.monotonic() - started:.1f} s after start")

            root = system.pebble.root_pem()
            (DEMO / "pebble-root.pem").write_bytes(root)
            ok = show_table(rows, system.https_port, client_context(root))
            say(f"\nshown {time.monotonic() - started:.1f} s after start")
            show_how_to(system, flower_port, upstream)
            if args.no_wait:
                return 0 if ok else 1
            say("\nthe demo stays up: Ctrl-C (or scripts/demo --stop) stops everything it started")
            while True:
                signal.pause()
    except KeyboardInterrupt:
        say("\nstopping ...")
        return 0
    finally:
        system.stop()
        PIDFILE.unlink(missing_ok=True)
        say("demo stopped")


def show_table(rows: list[dict[str, Any]], port: int, context: ssl.SSLContext) -> bool:
    ok = True
    header = f"{'name':42} {'state':8} {'issuer':26} {'serial':16} {'expires (UTC)':16}  page"
    say("\n" + header + "\n" + "-" * len(header))
    for row in rows:
        for name in [row["domain"], *row["aliases"]]:
            try:
                cert = fetch_certificate(port, name, context)
                page = fetch_page(port, name, context)
            except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
                ok = False
                cert = {"issuer": "-", "serial": "-", "expires": "-"}
                page = f"error: {exc}"[:48]
            ok = ok and page.startswith("200 ")
            say(
                f"{name:42} {row['state']:8} {cert['issuer'][:26]:26} {cert['serial']:16} "
                f"{cert['expires']:16}  {page}"
            )
    return ok


def show_how_to(system: Any, flower_port: int, upstream: str) -> None:
    env = {k: v for k, v in system.env.items() if k.startswith("CERTMAN_")}
    (DEMO / "env").write_text("".join(f"export {k}={v!r}\n" for k, v in sorted(env.items())))
    example = "northgate-motors.example.com"
    port = system.https_port
    say(
        f"""
Flower (tasks certman.issue.<step>, args [order_id, domain]): http://127.0.0.1:{flower_port}/
Edge: HTTPS on 127.0.0.1:{port}, HTTP on 127.0.0.1:{system.http_port}, \
metrics http://127.0.0.1:{system.metrics_port}/metrics

Try, in another shell from {REPO}:
  source .demo/env            # the CERTMAN_* settings of this demo
  .venv/bin/certman domains list
  .venv/bin/certman status
  .venv/bin/certman orders stuck
  .venv/bin/certman domains add new-dealer.example.com --upstream {upstream}
  curl --cacert .demo/pebble-root.pem --resolve {example}:{port}:127.0.0.1 https://{example}:{port}/"""
    )


if __name__ == "__main__":
    sys.exit(main())
