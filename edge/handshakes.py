"""Failed TLS handshakes: counted by reason, logged at DEBUG, never a traceback.

Scanners send the HTTPS port everything: no SNI, names that are not host names, SSLv3, plain
HTTP, random bytes. Each such connection ends in one of two reports, both per connection:

* Tornado's ``SSL Error on <fd> <peer>: <error>`` WARNING on ``tornado.general`` (every
  handshake OpenSSL fails, including those the SNI callback refuses: ``CALLBACK_FAILED``);
* for a server name that is not ASCII, CPython's ``Exception ignored in: b'...'`` with a
  ``UnicodeDecodeError`` traceback on stderr, through ``sys.unraisablehook``: it decodes the
  name before calling the SNI callback, and reports the failure itself (the handshake is then
  refused with ``internal_error`` and Tornado logs ``CALLBACK_FAILED`` as well).

:func:`install` replaces both with ``certman_edge_tls_failures_total{reason}`` (OpenSSL's
reason, or ``SERVER_NAME_NOT_ASCII``) and a DEBUG line on ``edge.handshakes``. Which names the
SNI callback refused, and why, is in ``certman_edge_sni_total{outcome}``.

Completed handshakes are timed by the HTTPS port's TLS layer (:mod:`edge.https`) into
``certman_edge_tls_handshake_seconds``: from the SNI callback's start (the ClientHello read;
:func:`edge.sni.sni_started`) to when the event loop sees the handshake done. A handshake that
fails is not timed: it is counted above.

Both hooks are process-wide, so a failure is counted on every edge installed in the process
(weakly held: an edge that is gone stops counting). The CLI runs one edge per process; only a
test process holding two edges at once sees each count the other's failures.
"""

from __future__ import annotations

import logging
import re
import ssl
import sys
import threading
import weakref
from types import TracebackType
from typing import Any

from tornado.log import gen_log

from edge.metrics import EdgeMetrics

__all__ = ["SERVER_NAME_NOT_ASCII", "failed", "install", "uninstall"]

log = logging.getLogger(__name__)

# tornado.iostream.SSLIOStream._do_ssl_handshake's message, matched by its format string.
_TORNADO_SSL_ERROR = "SSL Error on %s %s: %s"
SERVER_NAME_NOT_ASCII = "SERVER_NAME_NOT_ASCII"
# OpenSSL's reasons are upper-case identifiers; anything else is not a label value.
_REASON = re.compile(r"[A-Z][A-Z0-9_]{0,63}")

_edges: weakref.WeakSet[EdgeMetrics] = weakref.WeakSet()
_lock = threading.Lock()
# Set by the unraisable hook, read by the log filter right after, on the same thread: the
# undecodable name is what the CALLBACK_FAILED that follows is about.
_pending = threading.local()


def install(metrics: EdgeMetrics) -> None:
    """Count this edge's failed handshakes in ``metrics``; idempotent, cheap to repeat."""
    with _lock:
        _edges.add(metrics)
        if not any(isinstance(f, _SslErrorFilter) for f in gen_log.filters):
            gen_log.addFilter(_SslErrorFilter())
        # Checked on every install rather than once: a test harness may have replaced the hook.
        if not isinstance(sys.unraisablehook, _UnraisableHook):
            sys.unraisablehook = _UnraisableHook(sys.unraisablehook)


def uninstall(metrics: EdgeMetrics) -> None:
    """Stop counting in ``metrics`` (the hooks stay: they cost nothing without failures)."""
    with _lock:
        _edges.discard(metrics)


def _count(reason: str) -> None:
    for metrics in list(_edges):
        metrics.tls_failures.labels(reason).inc()


def reason_of(err: object) -> str:
    """The metric label for a handshake error: OpenSSL's reason, or the SSL error kind."""
    reason = getattr(err, "reason", None)
    if isinstance(reason, str) and _REASON.fullmatch(reason):
        return reason
    if isinstance(err, ssl.SSLError) and err.args and err.args[0] == ssl.SSL_ERROR_SYSCALL:
        return "SYSCALL"
    return "OTHER"


def failed(err: BaseException, peer: object = "?") -> None:
    """A handshake the event loop's TLS failed (the HTTPS port's asyncio path): counted and
    logged at DEBUG as Tornado's were."""
    reason = reason_of(err)
    pending = getattr(_pending, "reason", None)
    if pending is not None:
        _pending.reason = None
        if reason == "CALLBACK_FAILED":
            reason = pending
    _count(reason)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("TLS handshake from %s failed: %s (%s)", peer, reason, err)


class _SslErrorFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != _TORNADO_SSL_ERROR:
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        err = args[-1] if args else None
        reason = reason_of(err)
        pending = getattr(_pending, "reason", None)
        if pending is not None:
            _pending.reason = None
            if reason == "CALLBACK_FAILED":
                reason = pending
        _count(reason)
        if log.isEnabledFor(logging.DEBUG):
            peer = args[1] if len(args) > 1 else "?"
            log.debug("TLS handshake from %s failed: %s (%s)", peer, reason, err)
        return False


class _UnraisableHook:
    """Swallows the one unraisable exception a ClientHello can cause, passes on the rest."""

    def __init__(self, wrapped: Any) -> None:
        self.__wrapped__ = wrapped

    def __call__(self, unraisable: Any) -> None:
        if _is_server_name_decode(unraisable):
            _pending.reason = SERVER_NAME_NOT_ASCII
            return
        self.__wrapped__(unraisable)


def _is_server_name_decode(unraisable: Any) -> bool:
    # CPython's _servername_callback reports the failed decode with the raw name as the
    # object, while SSLSocket.do_handshake (or SSLObject's) is the Python frame running.
    if not isinstance(unraisable.exc_value, UnicodeDecodeError):
        return False
    if not isinstance(unraisable.object, bytes) or unraisable.err_msg is not None:
        return False
    tb: TracebackType | None = unraisable.exc_traceback
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "do_handshake" and code.co_filename == ssl.__file__:
            return True
        tb = tb.tb_next
    return False
