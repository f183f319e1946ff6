"""``certman-edge``: bind the ports, load the keys, optionally pre-fork, serve.

Sockets and the listening TLS context (which holds the session-ticket keys) are created before
forking, so every process accepts on the same ports and resumes the others' tickets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import ipaddress
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from tornado.netutil import bind_sockets

from edge.app import Edge, EdgeConfig
from edge.loops import valid_pseudonym
from edge.startup_checks import StartupProblem, check_paths
from edge.tls import PROFILES, listening_context
from pipeline import logformat
from pipeline.crypto.keys import KeyFileError, Keyring
from pipeline.crypto.signing import TrustedSigners
from pipeline.outbound import OutboundPolicy
from pipeline.redis_connect import RedisTarget
from pipeline.settings import SettingsError, get_settings
from pipeline.version import certman_version

__all__ = ["main"]

log = logging.getLogger("edge")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="certman-edge", description=__doc__.splitlines()[0])
    p.add_argument("--http-port", type=int, default=None, help="default: CERTMAN_HTTP01_PORT")
    p.add_argument("--https-port", type=int, default=443)
    p.add_argument("--metrics-port", type=int, default=9443, help="worker i uses this + i")
    p.add_argument("--version", action="version", version=f"%(prog)s {certman_version()}")
    p.add_argument("--address", default="", help="address of the site ports (default: all)")
    p.add_argument(
        "--metrics-address",
        default="127.0.0.1",
        help="address of /metrics and /healthz (default: 127.0.0.1; they are for operators)",
    )
    p.add_argument("--public-https-port", type=int, default=None, help="port in redirects")
    p.add_argument("--processes", type=int, default=None, help="default: CERTMAN_EDGE_PROCESSES")
    p.add_argument("--key-dir", type=Path, default=None, help="default: CERTMAN_EDGE_KEY_DIR")
    p.add_argument(
        "--trusted-signers",
        type=Path,
        default=None,
        help="the pipeline's signing public key(s): a .pub file or a directory of them "
        "(default: CERTMAN_EDGE_TRUSTED_SIGNERS)",
    )
    p.add_argument("--redis-url", default=None, help="default: CERTMAN_REDIS_URL")
    p.add_argument("--redis-prefix", default=None, help="default: CERTMAN_REDIS_PREFIX")
    p.add_argument("--cache-size", type=int, default=None, help="default: CERTMAN_EDGE_CACHE_SIZE")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where each process keeps its local sealed mirror (default: CERTMAN_DATA_DIR/edge)",
    )
    p.add_argument("--warm", action="store_true", help="build contexts in the background at start")
    p.add_argument(
        "--upstream-keepalive",
        type=int,
        default=32,
        help="idle keep-alive connections kept per upstream (0: one connection per request)",
    )
    p.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="CIDR",
        help="a load balancer whose forwarding headers are kept (repeatable)",
    )
    p.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="every connection on the site ports starts with a PROXY protocol v1/v2 header",
    )
    p.add_argument("--max-header-size", type=int, default=32 * 1024, help="bytes; larger gets 431")
    p.add_argument(
        "--max-body-size", type=int, default=100 * 1024 * 1024, help="bytes; larger gets 413"
    )
    p.add_argument(
        "--sync-down-limit",
        type=float,
        default=0.0,
        help="seconds without Redis after which /healthz answers 503 (default 0: never; the "
        "edge serves from its mirror meanwhile)",
    )
    p.add_argument(
        "--tls-profile",
        choices=PROFILES,
        default="intermediate",
        help="Mozilla server profile: intermediate (TLS 1.2 and 1.3) or modern (TLS 1.3 only)",
    )
    p.add_argument("--reconcile-interval", type=float, default=5.0, help=argparse.SUPPRESS)
    p.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop (auto: uvloop when installed)",
    )
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "--log-format",
        default=os.environ.get("CERTMAN_LOG_FORMAT") or "text",
        help="text, or json: one JSON object per line (default: CERTMAN_LOG_FORMAT, else text)",
    )
    _add_budget_arguments(p)
    return p


# ---- budgets and loops (edge.connections, edge.shares, edge.reach, edge.loops) ------------


def _env(name: str, default: str) -> str:
    return os.environ.get(f"CERTMAN_EDGE_{name}", default)


def _switch(value: str) -> bool:
    if value.strip().lower() in ("1", "on", "true", "yes"):
        return True
    if value.strip().lower() in ("", "0", "off", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not on or off")


def _add_budget_arguments(p: argparse.ArgumentParser) -> None:
    """Each defaults to its CERTMAN_EDGE_* variable (argparse converts a string default)."""
    add = p.add_argument
    add(
        "--max-connections",
        type=int,
        default=_env("MAX_CONNECTIONS", "0"),
        help="open client connections per process (default 0: half the open-file limit)",
    )
    add(
        "--max-connections-per-address",
        type=int,
        default=_env("MAX_CONNECTIONS_PER_ADDRESS", "128"),
        help="open connections per client address (IPv6: per /64) per process",
    )
    add(
        "--first-byte-timeout",
        type=float,
        default=_env("FIRST_BYTE_TIMEOUT", "10"),
        help="seconds from accept to a connection's first request byte (TLS included)",
    )
    add(
        "--max-upstream-connections",
        type=int,
        default=_env("MAX_UPSTREAM_CONNECTIONS", "1000"),
        help="upstream requests in flight per process, all sites together",
    )
    add(
        "--upstream-per-site",
        type=int,
        default=_env("UPSTREAM_PER_SITE", "100"),
        help="upstream requests in flight per site; more get 503 at once",
    )
    add(
        "--upstream-per-client",
        type=int,
        default=_env("UPSTREAM_PER_CLIENT", "32"),
        help="upstream requests in flight per client address; more get 503 at once",
    )
    add(
        "--upstream-queue",
        type=int,
        default=_env("UPSTREAM_QUEUE", "256"),
        help="requests that may wait for a slot while the total is full",
    )
    add(
        "--upstream-queue-timeout",
        type=float,
        default=_env("UPSTREAM_QUEUE_TIMEOUT", "2"),
        help="seconds a request may wait for a slot before a 503",
    )
    add(
        "--body-idle-timeout",
        type=float,
        default=_env("BODY_IDLE_TIMEOUT", "10"),
        help="seconds of silence within a request body before it is given up (408)",
    )
    add(
        "--min-body-rate",
        type=int,
        default=_env("MIN_BODY_RATE", "500"),
        help="bytes a second a request body must average after its first --body-idle-timeout "
        "seconds, or it is given up (408); 0: off",
    )
    add(
        "--upstream-response-timeout",
        type=float,
        default=_env("UPSTREAM_RESPONSE_TIMEOUT", "60"),
        help="seconds to wait for an upstream's response headers before a 504",
    )
    add(
        "--send-timeout",
        type=float,
        default=_env("SEND_TIMEOUT", "60"),
        help="seconds a client may take to accept one chunk of a response before it is cut",
    )
    add(
        "--allow-loopback-upstream",
        type=_switch,
        nargs="?",
        const=True,
        default=_env("ALLOW_LOOPBACK_UPSTREAM", "off"),
        help="allow upstreams on loopback (tests, a demo on one machine); never the edge itself",
    )
    add(
        "--via-pseudonym",
        default=_env("VIA_PSEUDONYM", ""),
        help="this edge's name in Via, for loop detection (default: a hash of the host name)",
    )


def _budget_config(args: argparse.Namespace) -> dict[str, Any]:
    """The EdgeConfig fields of _add_budget_arguments, or _fail naming the bad one."""
    counts = (
        "max_connections",
        "max_connections_per_address",
        "max_upstream_connections",
        "upstream_per_site",
        "upstream_per_client",
        "upstream_queue",
        "min_body_rate",
    )
    times = (
        "first_byte_timeout",
        "upstream_queue_timeout",
        "body_idle_timeout",
        "upstream_response_timeout",
        "send_timeout",
    )
    for name in (*counts, *times):
        # 0 means "derived" (max_connections), "no waiting" (the queue), "off" (timeouts).
        least = 0 if name in ("max_connections", "upstream_queue", "min_body_rate", *times) else 1
        if getattr(args, name) < least:
            _fail(f"--{name.replace('_', '-')} must be at least {least}")
    if args.via_pseudonym and not valid_pseudonym(args.via_pseudonym):
        _fail("--via-pseudonym must be a token of letters, digits, '.', '_' and '-'")
    config: dict[str, Any] = {name: getattr(args, name) for name in (*counts, *times)}
    config["allow_loopback_upstream"] = bool(args.allow_loopback_upstream)
    config["via_pseudonym"] = args.via_pseudonym or None
    return config


# ---- end of budgets and loops ---------------------------------------------------------------


# Set once logging writes JSON lines: a log pipeline must not meet a line of plain text then.
_json_errors = False


def _fail(message: str) -> NoReturn:
    if _json_errors:
        log.critical("certman-edge: %s", message)
    else:
        print(f"certman-edge: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    global _json_errors
    try:
        logformat.configure(args.log_level, args.log_format)
    except ValueError as exc:  # an unknown level or format
        _fail(f"--log-level / --log-format: {exc}")
    _json_errors = args.log_format == "json"
    budgets = _budget_config(args)
    try:
        settings = get_settings()
    except SettingsError as exc:
        _fail(str(exc))
    key_dir = args.key_dir or settings.edge_key_dir
    if key_dir is None:
        _fail("no key directory: pass --key-dir or set CERTMAN_EDGE_KEY_DIR")
    signers_path = args.trusted_signers or settings.edge_trusted_signers
    if signers_path is None:
        _fail(
            "no trusted signers: pass --trusted-signers or set CERTMAN_EDGE_TRUSTED_SIGNERS to "
            "the pipeline's signing .pub file (certman keys generate --purpose signing)"
        )
    state_dir = args.state_dir or settings.data_dir / "edge"
    try:
        check_paths(key_dir, signers_path, state_dir)
    except StartupProblem as exc:
        _fail(str(exc))
    try:
        keyring = Keyring.load_dir(key_dir)
    except KeyFileError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{key_dir}: {exc.strerror or exc}")
    try:
        signers = TrustedSigners.load(signers_path)
    except KeyFileError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{signers_path}: {exc.strerror or exc}")
    processes = args.processes or settings.edge_processes
    cache_size = args.cache_size or settings.edge_cache_size
    if processes < 1 or cache_size < 1:
        _fail("--processes and --cache-size must be at least 1")
    if args.max_header_size < 1024 or args.max_body_size < 0 or args.sync_down_limit < 0:
        _fail("--max-header-size must be at least 1024; sizes and limits not negative")
    try:
        trusted = tuple(str(ipaddress.ip_network(n, strict=False)) for n in args.trusted_proxy)
    except ValueError as exc:
        _fail(f"--trusted-proxy: {exc}")
    try:
        target = RedisTarget.from_settings(settings, url=args.redis_url)
    except ValueError as exc:
        _fail(f"--redis-url / CERTMAN_REDIS_URL: {exc}")
    http_port = args.http_port if args.http_port is not None else settings.http01_port
    try:
        http = bind_sockets(http_port, args.address or None)
        https = bind_sockets(args.https_port, args.address or None)
    except OSError as exc:
        _fail(f"cannot listen: {exc.strerror or exc}")
    listening = listening_context(args.tls_profile)
    config = EdgeConfig(
        redis_url=target.url,
        prefix=args.redis_prefix or settings.redis_prefix,
        cache_size=cache_size,
        warm=args.warm,
        https_public_port=args.public_https_port or args.https_port,
        reconcile_interval=args.reconcile_interval,
        upstream_keepalive=max(0, args.upstream_keepalive),
        trusted_proxies=trusted,
        proxy_protocol=args.proxy_protocol,
        max_header_size=args.max_header_size,
        max_body_size=args.max_body_size,
        sync_down_limit=args.sync_down_limit,
        outbound=OutboundPolicy.from_settings(settings),
        redis_tls=target.tls,
        redis_target=target,
        tls_profile=args.tls_profile,
        signers=signers,
        **budgets,
    )
    worker = 0
    if processes > 1:
        forked = _fork_workers(processes)
        if forked is None:
            return  # the supervisor: every worker has exited
        worker = forked
    try:
        metrics = bind_sockets(args.metrics_port + worker, args.metrics_address or None)
    except OSError as exc:
        _fail(f"cannot listen for metrics: {exc.strerror or exc}")
    config = dataclasses.replace(config, mirror_path=state_dir / f"mirror-{worker}.sqlite3")
    loop_factory = _loop_factory(args.loop)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(config, keyring, listening, http, https, metrics))


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's factory if wanted and installed; None means asyncio's default loop.

    uvloop does the per-connection work of Tornado's IOStream (add/remove reader and writer,
    call_soon, the selector) in C, which is a good part of a handshake's Python-side cost.
    """
    if choice == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            _fail("--loop uvloop: uvloop is not installed")
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _serve(
    config: EdgeConfig,
    keyring: Keyring,
    listening: ssl.SSLContext,
    http: list[socket.socket],
    https: list[socket.socket],
    metrics: list[socket.socket],
) -> None:
    edge = Edge(config, keyring, listening)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, edge.request_stop)
    edge.start(http, https, metrics)
    log.info("serving; waiting for the first snapshot from Redis")
    await edge.run_until_stopped()
    log.info("stopped")


def _fork_workers(count: int) -> int | None:
    """Fork ``count`` workers; return the worker's index in a child, None in the supervisor.

    Not ``tornado.process.fork_processes``: its parent cannot forward SIGTERM to the workers, so
    stopping the service would kill them without draining. This one forwards SIGTERM/SIGINT,
    restarts a worker that crashed, and returns once every worker has exited.
    """
    children: dict[int, int] = {}
    stopping = False

    def spawn(index: int) -> bool:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            return True
        children[pid] = index
        return False

    def forward(signum: int, _: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    # Installed before forking so that a signal in between is not lost; the child resets them.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(count):
        if spawn(index):
            return index
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index_or_none = children.pop(pid, None)
        if index_or_none is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if stopping or code == 0:
            continue
        log.warning("worker %d exited with %d; restarting it", index_or_none, code)
        time.sleep(1)  # a worker that dies at start must not turn this into a fork loop
        if spawn(index_or_none):
            return index_or_none
    return None


if __name__ == "__main__":
    main()
